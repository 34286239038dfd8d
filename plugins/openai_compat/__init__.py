"""The OpenAI-compatible surface (seed 001): ``/v1/chat/completions`` and ``/v1/models``."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
from litestar import Request, Router, get, post
from litestar.background_tasks import BackgroundTask
from litestar.exceptions import HTTPException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.response import Response, Stream
from litestar.types import ControllerRouterHandler

from core.errors import (
    InsufficientBalance,
    ProviderError,
    RateLimited,
    RateLimitExceeded,
    Unauthenticated,
    UnknownModel,
    UnknownProvider,
)
from core.hookspecs import hookimpl
from core.money import format_amount
from core.services.accounts import Caller
from core.services.completions import Completion
from core.store import ApiKey, RateLimits, RateUse
from core.surface import Surface
from core.types import ContentDelta, Finish, ProviderEvent, ReasoningDelta, ToolCallDelta

from . import wire
from .admin import admin_page, admin_router

CREATED = 1_735_689_600  # 2025-01-01: a fixed, honest "created" for configured models
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"


class Options(msgspec.Struct, forbid_unknown_fields=True):
    """``[surfaces.openai_compat]`` options."""

    owned_by: str = "chatgate"
    """What ``/v1/models`` reports as each model's owner."""
    keepalive_interval: float = 10.0
    """Seconds without a token after which a stream sends an SSE comment, so proxies keep it open."""
    requests_per_minute: int = 120
    """Default limit of each key (a key's own limit replaces it); 0: no limit."""
    tokens_per_minute: int = 400_000
    """Default limit of prompt plus completion tokens per key per minute; 0: no limit."""
    concurrent_requests: int = 16
    """Default limit of requests in flight per key; 0: no limit."""
    currency: str = "CNY"
    """What ``/user/balance`` names as the currency credits stand for (DeepSeek's shape)."""

    def __post_init__(self) -> None:
        if self.keepalive_interval <= 0:
            raise ValueError("keepalive_interval to be > 0")
        for field in ("requests_per_minute", "tokens_per_minute", "concurrent_requests"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} to be >= 0 (0: no limit)")

    def limits_for(self, key: ApiKey | None) -> RateLimits:
        """The limits a key works under: its own where set, else these defaults (0: none)."""
        own = key.limits if key is not None else RateLimits()

        def pick(field: str) -> int | None:
            value = getattr(own, field)
            value = getattr(self, field) if value is None else value
            return value or None

        return RateLimits(
            requests_per_minute=pick("requests_per_minute"),
            tokens_per_minute=pick("tokens_per_minute"),
            concurrent_requests=pick("concurrent_requests"),
        )


def duration(seconds: float) -> str:
    """A reset time the way OpenAI writes it: ``250ms``, ``20s``, ``1m5s``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"


def rate_headers(limits: RateLimits, use: RateUse | None) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for a key's limits and its use of them."""
    headers: dict[str, str] = {}
    if use is None:
        return headers
    for kind, allowed, used, reset in (
        ("requests", limits.requests_per_minute, use.requests, use.requests_reset),
        ("tokens", limits.tokens_per_minute, use.tokens, use.tokens_reset),
    ):
        if allowed is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(allowed)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, allowed - used))
            headers[f"x-ratelimit-reset-{kind}"] = duration(reset)
    return headers


def rate_limited(exc: RateLimitExceeded, limits: RateLimits) -> Response[Any]:
    """429 with ``Retry-After`` (and the millisecond form the openai SDK prefers)."""
    names = {
        "requests_per_minute": ("requests", "requests per minute (RPM)"),
        "tokens_per_minute": ("tokens", "tokens per minute (TPM)"),
        "concurrent_requests": ("requests", "concurrent requests"),
    }
    type_, what = names[exc.limit]
    wait = max(exc.retry_after, 0.001)
    headers = rate_headers(limits, exc.use)
    headers["Retry-After"] = str(max(1, math.ceil(wait)))
    headers["retry-after-ms"] = str(math.ceil(wait * 1000))
    message = (
        f"Rate limit reached for {what} on this API key: limit {exc.allowed}. "
        f"Please try again in {duration(wait)}."
    )
    return error(429, message, type_, "rate_limit_exceeded", headers=headers)


def error(
    status: int,
    message: str,
    type_: str,
    code: str | None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response[Any]:
    """OpenAI's error body."""
    return Response(wire.error_body(message, type_, code, param), status_code=status, headers=headers)


def provider_error(exc: ProviderError) -> Response[Any]:
    """A provider failure before anything was sent, with the status its type stands for."""
    headers = None
    if exc.retry_after is not None:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    type_ = "invalid_request_error" if exc.status == 400 else "upstream_error"
    if isinstance(exc, RateLimited):
        type_ = "rate_limit_error"
    return error(exc.status, exc.message, type_, exc.code, headers=headers)


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

    def route_handlers(self) -> Sequence[ControllerRouterHandler]:
        services = self.services
        options = self.options

        async def authenticate(request: Request[Any, Any, Any]) -> Caller | Response[Any]:
            try:
                return await services.accounts.authenticate_headers(request.headers)
            except Unauthenticated as exc:
                code = "missing_api_key" if exc.missing else "invalid_api_key"
                return error(401, str(exc), "invalid_request_error", code)

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
                return error(
                    404,
                    f"The model '{name}' does not exist",
                    "invalid_request_error",
                    "model_not_found",
                    "model",
                )
            return Response(model_object(name))

        @post("/v1/chat/completions", tags=["openai"], summary="Create a chat completion", status_code=200)
        async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
            caller = await authenticate(request)
            if isinstance(caller, Response):
                return caller
            try:
                parsed = wire.parse(await request.body())
            except wire.Invalid as exc:
                return error(400, exc.message, "invalid_request_error", exc.code, exc.param)
            try:
                route = services.catalog.route(parsed.request.model, request.headers.get("x-ai-provider"))
            except UnknownProvider as exc:
                return error(400, str(exc), "invalid_request_error", "unknown_provider")
            except UnknownModel:
                model = parsed.request.model
                return error(
                    404,
                    f"The model '{model}' does not exist or you do not have access to it.",
                    "invalid_request_error",
                    "model_not_found",
                    "model",
                )
            limits = options.limits_for(caller.key)
            try:
                completion = await services.completions.start(caller, route, parsed.request, limits)
            except RateLimitExceeded as exc:
                return rate_limited(exc, limits)
            except InsufficientBalance as exc:
                return error(403, str(exc), "insufficient_quota", "insufficient_user_quota")
            headers = rate_headers(limits, completion.use)
            if parsed.stream:
                return await stream_reply(completion, parsed, headers)
            return await whole_reply(completion, headers)

        async def whole_reply(completion: Completion, headers: dict[str, str]) -> Response[Any]:
            try:
                await completion.result()
            except ProviderError as exc:
                return provider_error(exc)
            assert completion.finish is not None
            body = wire.completion_body(
                wire.Reply(completion.request.model),
                completion.text,
                "".join(completion.reasoning),
                list(completion.tool_calls.values()),
                completion.finish,
            )
            return Response(body, headers=headers)

        def render(reply: wire.Reply, event: ProviderEvent, usage: bool) -> bytes:
            match event:
                case ContentDelta(text=text):
                    return wire.chunk(reply, {"content": text}, usage=usage)
                case ReasoningDelta(text=text):
                    return wire.chunk(reply, {"reasoning_content": text}, usage=usage)
                case ToolCallDelta() as part:
                    return wire.chunk(reply, {"tool_calls": [wire.tool_call_delta(part)]}, usage=usage)
                case Finish(reason=reason, usage=counted):
                    end = wire.chunk(reply, {}, reason, usage=usage)
                    return end + wire.usage_chunk(reply, counted) if usage else end
            return b""

        async def stream_reply(
            completion: Completion, parsed: wire.Parsed, headers: dict[str, str]
        ) -> Response[Any]:
            # Wait for the first event before answering, so a request the upstream
            # refuses gets a real status code instead of a 200 with an error event.
            try:
                first = await completion.next_event(options.keepalive_interval)
            except TimeoutError:
                first = None
                waiting = True
            except ProviderError as exc:
                return provider_error(exc)
            else:
                waiting = False

            async def body() -> AsyncIterator[bytes]:
                reply = wire.Reply(completion.request.model)
                usage = parsed.include_usage
                yield wire.chunk(reply, {"role": "assistant", "content": ""}, usage=usage)
                event = first
                pending = waiting
                try:
                    while True:
                        if pending:
                            try:
                                event = await completion.next_event(options.keepalive_interval)
                            except TimeoutError:
                                yield KEEPALIVE
                                continue
                            pending = False
                        if event is None:
                            break
                        # Events that arrived together leave together: one write, not one each.
                        yield b"".join([render(reply, e, usage) for e in [event, *completion.ready_events()]])
                        event = await completion.next_event()
                except ProviderError as exc:
                    # Too late for a status code: OpenAI's SDK raises APIError on this event.
                    type_ = "rate_limit_error" if isinstance(exc, RateLimited) else "upstream_error"
                    yield (
                        b"data: "
                        + msgspec.json.encode(wire.error_body(exc.message, type_, exc.code))
                        + b"\n\n"
                    )
                yield DONE

            async def stop() -> None:  # after the response, or when the client went away
                completion.cancel()

            return Stream(
                body(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
                background=BackgroundTask(stop),
            )

        @get("/user/balance", tags=["openai"], summary="The caller's balance, in DeepSeek's shape")
        async def user_balance(request: Request[Any, Any, Any]) -> Response[Any]:
            caller = await authenticate(request)
            if isinstance(caller, Response):
                return caller
            user = await services.accounts.get_user(caller.user.id)  # the caller may be remembered
            total = format_amount(max(user.balance, 0))
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
            return error(exc.status_code, message, type_, None, headers=exc.headers)

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
