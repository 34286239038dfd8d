"""``GET`` and ``DELETE /v1/responses/{id}`` and ``GET /v1/responses/{id}/input_items``.

Ordinary Litestar handlers under the surface's router, which provides ``caller`` (the
key's owner: 401 otherwise) and answers :class:`Refused` in OpenAI's error body.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, delete, get
from litestar.di import NamedDependency
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.spec import OpenAPIType, Schema
from litestar.params import Parameter
from litestar.response import Response

from core import Caller, Services, documented_route

from ..options import Options
from ..responses import Refused
from .endpoint import Responses
from .saved import Missing, Saved, Stored


def _saved(services: Services, options: Options) -> Saved:
    return Saved(services, options.responses_retention_days)


async def _stored(services: Services, options: Options, caller: Caller, response_id: str) -> Stored:
    try:
        return await _saved(services, options).load(caller.user.id, response_id)
    except Missing:
        raise Refused(404, f"Response with id '{response_id}' not found.", None, "response_id") from None


class ResponsesController(Controller):
    """Stored responses of the caller's key owner.

    Promises: a response that is unknown, deleted, past its retention, stored with
    ``store: false``, still being generated, or another user's answers 404 in OpenAI's shape (never its
    content); ``input_items`` lists the response's own input (not its chain's), each
    item with an ``id``, newest first unless ``order=asc``, ``limit`` at a time.
    """

    path = "/"
    tags = ("openai",)

    @get(["/v1/responses/{response_id:str}", "/responses/{response_id:str}"], summary="Retrieve a response")
    async def retrieve(
        self,
        services: NamedDependency[Services],
        options: NamedDependency[Options],
        caller: NamedDependency[Caller],
        response_id: str,
    ) -> Response[Any]:
        return Response((await _stored(services, options, caller, response_id)).response)

    @delete(
        ["/v1/responses/{response_id:str}", "/responses/{response_id:str}"],
        summary="Delete a response",
        status_code=200,
    )
    async def remove(
        self,
        services: NamedDependency[Services],
        options: NamedDependency[Options],
        caller: NamedDependency[Caller],
        response_id: str,
    ) -> Response[Any]:
        try:
            await _saved(services, options).delete(caller.user.id, response_id)
        except Missing:
            raise Refused(404, f"Response with id '{response_id}' not found.", None, "response_id") from None
        return Response({"id": response_id, "object": "response", "deleted": True})

    @get(
        ["/v1/responses/{response_id:str}/input_items", "/responses/{response_id:str}/input_items"],
        summary="List a response's input items",
    )
    async def input_items(
        self,
        services: NamedDependency[Services],
        options: NamedDependency[Options],
        caller: NamedDependency[Caller],
        response_id: str,
        after: str | None = None,
        limit: int = Parameter(default=20),
        order: str = Parameter(default="desc"),
    ) -> Response[Any]:
        if not 1 <= limit <= 100:
            raise Refused(
                400, f"Invalid 'limit': expected an integer from 1 to 100, got {limit}.", None, "limit"
            )
        if order not in ("asc", "desc"):
            raise Refused(400, f"Invalid 'order': expected 'asc' or 'desc', got {order!r}.", None, "order")
        items = list((await _stored(services, options, caller, response_id)).input.items)
        if order == "desc":
            items.reverse()
        if after is not None:
            at = next((i for i, item in enumerate(items) if item.get("id") == after), None)
            if at is None:
                raise Refused(400, f"Invalid 'after': no input item with id '{after}'.", None, "after")
            items = items[at + 1 :]
        page = items[:limit]
        body = {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
        return Response(body)


def responses_route(endpoint: Responses) -> list[HTTPRouteHandler]:
    """``POST /v1/responses`` in the schema, and through the router for the spellings the front
    door does not take (a trailing slash); the same raw ASGI app answers both."""
    return documented_route(
        ["/v1/responses", "/responses"],
        endpoint,
        summary="Create a response",
        description=(
            "OpenAI's Responses API, streamed (server-sent events) or whole, with previous_response_id "
            "chained on the caller's stored responses. Errors answer OpenAI's error body."
        ),
        tags=["openai"],
        body=Schema(
            type=OpenAPIType.OBJECT,
            required=["model"],
            properties={
                "model": Schema(type=OpenAPIType.STRING),
                "input": Schema(
                    one_of=[
                        Schema(type=OpenAPIType.STRING),
                        Schema(type=OpenAPIType.ARRAY, items=Schema(type=OpenAPIType.OBJECT)),
                    ]
                ),
                "instructions": Schema(type=OpenAPIType.STRING),
                "previous_response_id": Schema(type=OpenAPIType.STRING),
                "store": Schema(type=OpenAPIType.BOOLEAN),
                "stream": Schema(type=OpenAPIType.BOOLEAN),
            },
        ),
    )
