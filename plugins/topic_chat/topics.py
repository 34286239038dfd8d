"""``/chat/topic``: a key holder's topics, each a conversation with its own context; and
``/chat/series``, the series a topic belongs to and the models that may answer in it."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, delete, get, patch, post
from litestar.di import NamedDependency
from msgspec import UnsetType

from core import Caller, ConversationPatch

from .context import KIND, TopicChat
from .errors import Invalid
from .wire import (
    NAME_MISSING,
    NAME_WRONG,
    NewTopic,
    SeriesEntry,
    Topic,
    TopicChange,
    path_id,
    read,
    required,
    topic_of,
)

MAX_NAME = 200


class TopicController(Controller):
    """Create, list, show, change and delete the caller's topics.

    Promises: a caller sees and changes only their own topics (anyone else's
    id is 404, like a missing one); bad input is 400 naming the field, with
    nothing written.
    """

    path = "/chat/topic"
    tags = ("topic-chat",)

    # Bodies, like ids, are read by hand: after the key is checked (a client without one learns
    # nothing about its body), and so every bad one is told in this surface's words.

    @post(summary="Create a topic", status_code=200)
    async def create_topic(
        self,
        request: Request[Any, Any, Any],
        chat: NamedDependency[TopicChat],
        caller: NamedDependency[Caller],
    ) -> Topic:
        body = read(await request.body(), NewTopic)
        name = body.name
        if name is None or not name.strip():
            raise Invalid(NAME_MISSING)
        if len(name) > MAX_NAME:
            raise Invalid(f"field 'name' is longer than {MAX_NAME} characters")
        series_id = required(body.series_id, "seriesId")
        if series_id not in chat.catalog:
            raise Invalid(f"field 'seriesId': there is no series {series_id}")
        return topic_of(await chat.services.conversations.create(caller.user.id, KIND, name, series_id))

    @get(summary="List the caller's topics")
    async def list_topics(
        self,
        request: Request[Any, Any, Any],
        chat: NamedDependency[TopicChat],
        caller: NamedDependency[Caller],
    ) -> list[Topic]:
        raw = request.query_params.get("seriesId")
        series_id = path_id(raw, "seriesId", "query parameter") if raw is not None else None
        found = await chat.services.conversations.list(caller.user.id, KIND, series_id)
        return [topic_of(t) for t in found]

    @get("/{topic_id:str}", summary="One topic")
    async def get_topic(
        self, chat: NamedDependency[TopicChat], caller: NamedDependency[Caller], topic_id: str
    ) -> Topic:
        return topic_of(await chat.own_topic(caller, topic_id))

    @patch("/{topic_id:str}", summary="Rename or (un)favourite a topic")
    async def update_topic(
        self,
        request: Request[Any, Any, Any],
        chat: NamedDependency[TopicChat],
        caller: NamedDependency[Caller],
        topic_id: str,
    ) -> Topic:
        found = await chat.own_topic(caller, topic_id)
        body = read(await request.body(), TopicChange)
        name, favorite = body.name, body.favorite
        if not isinstance(name, UnsetType) and (not name.strip() or len(name) > MAX_NAME):
            raise Invalid(NAME_WRONG)
        if isinstance(name, UnsetType) and isinstance(favorite, UnsetType):
            # A client that sent neither meant to change something: say so.
            raise Invalid("nothing to change: send field 'name', 'favorite' or both")
        changes = ConversationPatch(name=name, favorite=False if favorite is None else favorite)
        return topic_of(await chat.services.conversations.update(caller.user.id, found.id, changes))

    @delete("/{topic_id:str}", summary="Delete a topic", status_code=200)
    async def delete_topic(
        self, chat: NamedDependency[TopicChat], caller: NamedDependency[Caller], topic_id: str
    ) -> Topic:
        found = await chat.own_topic(caller, topic_id)
        return topic_of(await chat.services.conversations.delete(caller.user.id, found.id))


@get("/chat/series", tags=["topic-chat"], summary="The series and models clients may pick")
async def series(chat: NamedDependency[TopicChat], caller: NamedDependency[Caller]) -> list[SeriesEntry]:
    """The catalog; like every topic-chat route, for key holders only (``caller`` is the check)."""
    return chat.catalog.listing
