"""The topic-chat surface (seed 002): per-user topics, each a separate context."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec
from litestar import Request, get
from litestar.response import Response
from litestar.types import ControllerRouterHandler

from core.errors import NotFound, Unauthenticated
from core.hookspecs import hookimpl
from core.services.accounts import Caller
from core.store import Conversation
from core.surface import Surface

KIND = "topic"


class Options(msgspec.Struct, forbid_unknown_fields=True):
    """``[surfaces.topic_chat]`` options."""


def timestamp(moment: datetime) -> str:
    """ISO 8601 UTC with milliseconds and ``Z``, as the seed shows: ``2023-04-03T06:07:55.371Z``."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def topic(conversation: Conversation) -> dict[str, Any]:
    return {
        "id": conversation.id,
        "userId": conversation.user_id,
        "name": conversation.name,
        "seriesId": conversation.series_id,
        "favorite": conversation.favorite,
        "createdAt": timestamp(conversation.created_at),
        "updatedAt": timestamp(conversation.updated_at),
    }


def failure(status: int, message: str) -> Response[Any]:
    return Response({"statusCode": status, "message": message}, status_code=status)


class TopicChatSurface(Surface):
    """Topics with their own context, for the seed's chat clients."""

    name = "topic_chat"
    Options = Options

    def route_handlers(self) -> Sequence[ControllerRouterHandler]:
        services = self.services

        async def authenticate(request: Request[Any, Any, Any]) -> Caller | Response[Any]:
            try:
                return await services.accounts.authenticate_headers(request.headers)
            except Unauthenticated as exc:
                return failure(401, str(exc))

        @get("/chat/topic", tags=["topic-chat"], summary="List the caller's topics")
        async def list_topics(request: Request[Any, Any, Any]) -> Response[Any]:
            caller = await authenticate(request)
            if isinstance(caller, Response):
                return caller
            raw_series = request.query_params.get("seriesId")
            if raw_series is not None and not raw_series.lstrip("-").isdigit():
                return failure(400, f"query parameter 'seriesId' must be an integer, got {raw_series!r}")
            series_id = int(raw_series) if raw_series is not None else None
            topics = await services.conversations.list(caller.user.id, KIND, series_id)
            return Response([topic(t) for t in topics])

        @get("/chat/topic/{topic_id:int}", tags=["topic-chat"], summary="One topic")
        async def get_topic(request: Request[Any, Any, Any], topic_id: int) -> Response[Any]:
            caller = await authenticate(request)
            if isinstance(caller, Response):
                return caller
            try:
                found = await services.conversations.get(caller.user.id, topic_id)
            except NotFound:
                return failure(404, f"topic {topic_id} not found")
            if found.kind != KIND:
                return failure(404, f"topic {topic_id} not found")
            return Response(topic(found))

        return [list_topics, get_topic]


@hookimpl
def register_surfaces() -> list[type[Surface]]:
    return [TopicChatSurface]
