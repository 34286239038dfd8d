"""The topic-chat surface (seed 002): per-user topics, each its own context, replies streamed as text.

``topics`` and ``messages`` hold the routes, ``context`` what they work with (the
services, the catalog, the caller), ``wire`` the seed's shapes, ``replies`` the streamed
answer, ``catalog`` the series clients pick from, ``errors`` the seed's error shape and
``page`` the ``/chat`` page.
"""

from __future__ import annotations

from collections.abc import Sequence

from litestar import Router
from litestar.di import Provide
from litestar.types import ControllerRouterHandler

from core import Services, Surface, hookimpl

from .context import TopicChat, authenticate
from .errors import Failures
from .messages import MessageController
from .options import CatalogModel, Options, Series
from .page import chat_page
from .topics import TopicController, series

__all__ = ["CatalogModel", "Options", "Series", "TopicChatSurface"]


class TopicChatSurface(Surface):
    """Topics with their own context, for the seed's chat clients.

    Promises: every endpoint needs an API key and shows only the caller's
    own topics (anyone else's id is 404, like a missing one); a reply is
    streamed as plain text while it is generated, then ``¦`` and its
    metadata JSON, and is stored however the client fares; bad input is 400
    naming the field, with nothing written.
    """

    name = "topic_chat"
    Options = Options

    def route_handlers(self, services: Services) -> Sequence[ControllerRouterHandler]:
        """The topic and message routes, ``/chat/series`` and the ``/chat`` page.

        Raises:
            ConfigError: the catalog names a model or provider that is not configured,
                or uses an id twice.
        """
        chat = TopicChat(services, self.options)
        # Two dependencies, one after the other: ``caller`` needs ``chat`` (see TopicChat).
        dependencies = {
            "chat": Provide(lambda: chat, use_cache=True, sync_to_thread=False),
            "caller": Provide(authenticate),
        }
        api = Router(
            "/",
            route_handlers=[TopicController, MessageController, series],
            dependencies=dependencies,
            exception_handlers={Exception: Failures(services.config.server.max_body_bytes)},
        )
        return [api, chat_page()]


@hookimpl
def register_surfaces() -> list[type[Surface]]:
    return [TopicChatSurface]
