"""The OpenAI-compatible surface (seed 001): ``/v1/chat/completions`` and ``/v1/models``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from litestar import MediaType, Request, Router, asgi, get
from litestar.exceptions import HTTPException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.response import Response
from litestar.types import ASGIApp, ControllerRouterHandler, Receive, Scope, Send

from core import Caller, KeyLimits, Services, Surface, Unauthenticated, format_amount, hookimpl

from .admin import admin_page, admin_router
from .answers import Answer, duration, error
from .endpoint import ChatCompletions

__all__ = ["OpenAICompatSurface", "Options", "duration"]

CREATED = 1_735_689_600  # 2025-01-01: a fixed, honest "created" for configured models


class Options(KeyLimits, forbid_unknown_fields=True):
    """``[surfaces.openai_compat]`` options.

    ``requests_per_minute``, ``tokens_per_minute`` and ``concurrent_requests``
    (see :class:`~core.services.accounts.KeyLimits`) are every key's default
    limits, on every surface a key is used on.
    """

    owned_by: str = "chatgate"
    """What ``/v1/models`` reports as each model's owner."""
    keepalive_interval: float = 10.0
    """Seconds without a token after which a stream sends an SSE comment, so proxies keep it open."""
    currency: str = "CNY"
    """What ``/user/balance`` names as the currency credits stand for (DeepSeek's shape)."""

    def __post_init__(self) -> None:
        if self.keepalive_interval <= 0:
            raise ValueError("keepalive_interval to be > 0")
        super().__post_init__()

    def key_limits(self) -> KeyLimits:
        return KeyLimits(self.requests_per_minute, self.tokens_per_minute, self.concurrent_requests)


def respond(answer: Answer) -> Response[Any]:
    """An :class:`Answer` as a Litestar response."""
    return Response(
        answer.body, status_code=answer.status, media_type=MediaType.JSON, headers=answer.headers or None
    )


class OpenAICompatSurface(Surface):
    """Speaks OpenAI's REST shapes so the official SDKs work unchanged.

    Promises: every error answers OpenAI's error body; a request is charged
    to the key owner's balance exactly once (reserved before it goes
    upstream, settled to the tokens produced, also when the client goes
    away mid-stream); a stream that fails after it began ends with an
    ``{"error": ...}`` event, never as an empty success.
    """

    name = "openai_compat"
    Options = Options
    completions: ChatCompletions | None = None

    def direct_routes(self, services: Services) -> Mapping[str, ASGIApp]:
        return {"/v1/chat/completions": self._completions(services)}

    def _completions(self, services: Services) -> ChatCompletions:
        """The one raw ASGI app of ``/v1/chat/completions``, for the router and the front door."""
        if self.completions is None:
            self.completions = ChatCompletions(services, self.options)
        return self.completions

    def route_handlers(self, services: Services) -> Sequence[ControllerRouterHandler]:
        options = self.options
        # The keys' default limits are configured here but hold on every surface (topic chat's).
        services.accounts.key_limits = options.key_limits()

        async def authenticate(request: Request[Any, Any, Any]) -> Caller | Response[Any]:
            try:
                return await services.accounts.authenticate_headers(request.headers)
            except Unauthenticated as exc:
                code = "missing_api_key" if exc.missing else "invalid_api_key"
                return respond(error(401, str(exc), "invalid_request_error", code))

        def model_object(name: str) -> dict[str, object]:
            return {"id": name, "object": "model", "created": CREATED, "owned_by": options.owned_by}

        @get("/v1/models", tags=["openai"], summary="List models")
        async def list_models(request: Request[Any, Any, Any]) -> Response[Any]:
            caller = await authenticate(request)
            if isinstance(caller, Response):
                return caller
            data = [model_object(name) for name in services.catalog.models]
            return Response({"object": "list", "data": data})

        @get("/v1/models/{model_id:path}", tags=["openai"], summary="Retrieve a model")
        async def retrieve_model(request: Request[Any, Any, Any], model_id: str) -> Response[Any]:
            caller = await authenticate(request)
            if isinstance(caller, Response):
                return caller
            name = model_id.lstrip("/")
            if name not in services.catalog.models:
                message = f"The model '{name}' does not exist"
                return respond(error(404, message, "invalid_request_error", "model_not_found", "model"))
            return Response(model_object(name))

        endpoint = self._completions(services)

        @asgi("/v1/chat/completions", is_mount=False, copy_scope=False)
        async def chat_completions(scope: Scope, receive: Receive, send: Send) -> None:
            await endpoint(scope, receive, send)

        @get("/user/balance", tags=["openai"], summary="The caller's balance, in DeepSeek's shape")
        async def user_balance(request: Request[Any, Any, Any]) -> Response[Any]:
            caller = await authenticate(request)
            if isinstance(caller, Response):
                return caller
            user = await services.accounts.get_user(caller.user.id)  # the caller may be remembered
            total = format_amount(user.balance)  # what is stored, negative included: never hidden
            info = {
                "currency": options.currency,
                "total_balance": total,
                "granted_balance": format_amount(0),
                "topped_up_balance": total,
            }
            return Response({"is_available": user.balance > 0, "balance_infos": [info]})

        handlers: list[ControllerRouterHandler] = [
            list_models,
            retrieve_model,
            chat_completions,
            user_balance,
        ]
        token = services.config.server.admin_token
        if token:
            handlers += [admin_router(services, token), admin_page()]
        limit = services.config.server.max_body_bytes

        def http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
            # Litestar's own refusals (oversized body, wrong method) in OpenAI's shape too.
            message = exc.detail
            if isinstance(exc, RequestEntityTooLarge):
                message = f"The request body is larger than this server's limit of {limit} bytes."
            type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
            return respond(error(exc.status_code, message, type_, None, headers=exc.headers))

        return [
            Router(
                "/",
                route_handlers=handlers,
                exception_handlers={HTTPException: http_error},
            )
        ]


@hookimpl
def register_surfaces() -> list[type[Surface]]:
    return [OpenAICompatSurface]
