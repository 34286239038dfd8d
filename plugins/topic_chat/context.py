"""What every topic-chat route works with: the services, this surface's state, and the caller."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from litestar import Request
from litestar.di import NamedDependency

from core import Caller, Conversation, NotFound, Payer, Services

from .catalog import SeriesCatalog
from .options import Options
from .wire import path_id

KIND = "topic"
"""The kind of conversation a topic is: the email surface's conversations are never topics."""


class Listings:
    """Topics' message lists as last rendered, by topic id, while their ``revision`` holds.

    A long topic that a client reloads again and again then costs two small
    reads (the topic, the running reply), not a rendering; the least recently
    read leave first, past ``capacity``.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._bodies: OrderedDict[int, tuple[int, bytes]] = OrderedDict()  # topic id: revision, body

    def get(self, topic: Conversation) -> bytes | None:
        """The list of ``topic`` as rendered at its current revision, if it was."""
        cached = self._bodies.get(topic.id)
        if cached is None or cached[0] != topic.revision:
            return None
        self._bodies.move_to_end(topic.id)
        return cached[1]

    def put(self, topic: Conversation, body: bytes) -> None:
        """Keep ``body``, the list of ``topic`` at its current revision, with no reply running."""
        self._bodies[topic.id] = (topic.revision, body)
        while len(self._bodies) > self.capacity:
            self._bodies.popitem(last=False)


class TopicChat:
    """One topic-chat surface's services, options, catalog and rendered lists: the ``chat``
    every route receives by dependency injection.

    One object, not one dependency each: Litestar resolves a handler's independent
    dependencies concurrently, in a task group of their own (measured: 60 µs more
    per ``GET /chat/series``, three times the route's own work).
    """

    def __init__(self, services: Services, options: Options) -> None:
        self.services = services
        self.options = options
        self.catalog = SeriesCatalog(options, services)
        self.listings = Listings(services.conversations.cached_conversations)

    async def own_topic(self, caller: Caller, raw_id: str, field: str = "id") -> Conversation:
        """The caller's topic ``raw_id``: anyone else's, or a conversation that is no topic, is
        :class:`~core.NotFound` like a missing one; an id that is no plain integer is 400 naming ``field``."""
        topic_id = path_id(raw_id, field)
        try:
            found = await self.services.conversations.get(caller.user.id, topic_id)  # NotFound for others'
        except NotFound:
            found = None
        if found is None or found.kind != KIND:
            raise NotFound(f"topic {topic_id} not found")
        return found

    def payer_of(self, caller: Caller) -> Payer:
        """The caller's balance pays; a key's requests here count against its limits together with
        its ``/v1`` requests."""
        key = caller.key
        if key is None:
            return Payer(balance=caller.user.balance)
        limits = self.services.accounts.limits_for(key)
        return Payer(key_id=key.id, limits=limits, balance=caller.user.balance)


async def authenticate(request: Request[Any, Any, Any], chat: NamedDependency[TopicChat]) -> Caller:
    """The ``caller`` every route depends on: the key's owner (``Unauthenticated``: 401)."""
    return await chat.services.accounts.authenticate_headers(request.headers)
