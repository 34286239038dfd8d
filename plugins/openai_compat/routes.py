"""A key holder's routes besides the chat: ``/v1/models`` and DeepSeek's ``/user/balance``."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get, route
from litestar.di import NamedDependency
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.spec import OpenAPIType, Schema
from litestar.response import Response

from core import Caller, Services, Unauthenticated, documented_route, format_amount, model_list, model_object

from .endpoint import ChatCompletions
from .options import Options
from .responses import Refused


async def key_holder(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Caller:
    """The caller of a request with a key (``Authorization: Bearer`` or ``X-API-Key``); 401 otherwise."""
    try:
        return await services.accounts.authenticate_headers(request.headers)
    except Unauthenticated as exc:
        code = "missing_api_key" if exc.missing else "invalid_api_key"
        raise Refused(401, str(exc), code) from None


class OpenAIController(Controller):
    """The models a key may name, and its owner's balance.

    Promises: every route answers 401 in OpenAI's shape without a valid key
    (``caller``, provided by :func:`key_holder`, is its owner); a model that is
    not configured is 404.
    """

    path = "/"
    tags = ("openai",)

    @get(["/v1/models", "/models"], summary="List models")
    async def list_models(
        self,
        services: NamedDependency[Services],
        options: NamedDependency[Options],
        caller: NamedDependency[Caller],
    ) -> Response[Any]:
        # One body for both SDK families: Anthropic's clients (Claude Code's model discovery) ask here too.
        return Response(model_list(services.catalog.models, options.owned_by))

    @get(["/v1/models/{model_id:path}", "/models/{model_id:path}"], summary="Retrieve a model")
    async def retrieve_model(
        self,
        services: NamedDependency[Services],
        options: NamedDependency[Options],
        caller: NamedDependency[Caller],
        model_id: str,
    ) -> Response[Any]:
        name = model_id.lstrip("/")
        if name not in services.catalog.models:
            raise Refused(404, f"The model '{name}' does not exist", "model_not_found", "model")
        return Response(model_object(name, services.catalog.models[name], options.owned_by))

    @route(
        ["/v1", "/v1/{rest:path}"],
        http_method=["GET", "POST", "PUT", "PATCH", "DELETE"],
        include_in_schema=False,
    )
    async def unknown_path(self, request: Request[Any, Any, Any]) -> Response[Any]:
        """Any other path under ``/v1``: 404 in OpenAI's own shape, so the SDKs show why (the
        body OpenAI answers for a path under /v1 it does not serve, research/dialects.md C.2)."""
        message = f"Invalid URL ({request.method} {request.url.path})"
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
        return Response(body, status_code=404)

    @get("/user/balance", summary="The caller's balance, in DeepSeek's shape")
    async def user_balance(
        self,
        services: NamedDependency[Services],
        options: NamedDependency[Options],
        caller: NamedDependency[Caller],
    ) -> Response[Any]:
        user = await services.accounts.get_user(caller.user.id)  # the caller may be remembered
        total = format_amount(user.balance)  # what is stored, negative included: never hidden
        info = {
            "currency": options.currency,
            "total_balance": total,
            "granted_balance": format_amount(0),
            "topped_up_balance": total,
        }
        return Response({"is_available": user.balance > 0, "balance_infos": [info]})


def completions_route(endpoint: ChatCompletions) -> list[HTTPRouteHandler]:
    """``POST /v1/chat/completions`` in the schema, and through the router for the spellings the
    front door does not take (a trailing slash); the same raw ASGI app answers both."""
    return documented_route(
        ["/v1/chat/completions", "/chat/completions"],
        endpoint,
        summary="Create a chat completion",
        description=(
            "OpenAI's chat completions, streamed (server-sent events) or whole; the official SDKs work "
            "unchanged. Errors answer OpenAI's error body."
        ),
        tags=["openai"],
        body=Schema(
            type=OpenAPIType.OBJECT,
            required=["model", "messages"],
            properties={
                "model": Schema(type=OpenAPIType.STRING),
                "messages": Schema(type=OpenAPIType.ARRAY, items=Schema(type=OpenAPIType.OBJECT)),
                "stream": Schema(type=OpenAPIType.BOOLEAN),
            },
        ),
    )
