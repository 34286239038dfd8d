"""``POST /v1/chat/completions`` as a raw ASGI app.

This is the gateway's busiest path, so it skips Litestar's request and
response objects (signature parsing, header wrappers, response building,
which together cost more CPU than the upstream call): it reads the headers
it needs straight from the ASGI scope, answers a whole reply in one write,
and watches the connection itself so a client that leaves cancels the
upstream request, whole or streamed. Every other route of the surface is an
ordinary Litestar handler; both answer the same bytes through
:mod:`.answers`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from litestar.types import HTTPScope, Receive, Scope, Send

from core import (
    Answer,
    BodyTooLarge,
    ClientGone,
    Completion,
    ContentDelta,
    ContextTooLong,
    Finish,
    InsufficientBalance,
    OutOfStanding,
    ProviderError,
    ProviderEvent,
    RateLimitExceeded,
    ReasoningDelta,
    Services,
    ToolCallDelta,
    Unauthenticated,
    UnknownModel,
    UnknownProvider,
    json_answer,
    read_body,
    request_headers,
    send_answer,
    start_stream,
)

from . import wire
from .answers import error, provider_error, rate_headers, rate_limited, stream_error

if TYPE_CHECKING:
    from .options import Options

log = logging.getLogger("chatgate.openai_compat")

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
_READ = frozenset({b"authorization", b"x-api-key", b"x-ai-provider", b"content-length"})


def scope_headers(scope: Scope) -> dict[str, str]:
    """The few request headers this endpoint reads."""
    return request_headers(scope, _READ)


def render(reply: wire.Reply, event: ProviderEvent, usage: bool) -> bytes:
    """One provider event as ``chat.completion.chunk`` events."""
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
    # Unreachable by the types; an event of another kind from a third-party provider is skipped.
    return b""  # type: ignore[unreachable]


def not_post(method: str) -> Answer:
    """OPTIONS says what is allowed (as Litestar answers it on every other route); the rest are 405."""
    allow = {"Allow": "OPTIONS, POST"}
    if method == "OPTIONS":
        return Answer(204, b"", allow)
    message = f"Method {method} is not allowed on /v1/chat/completions; use POST."
    return error(405, message, "invalid_request_error", None, headers=allow)


class ChatCompletions:
    """The ASGI app of ``POST /v1/chat/completions``.

    Promises: every refusal is OpenAI's error body with the status its
    cause stands for; nothing goes upstream, and nothing is charged, before
    the key, the body and the limits have passed; a client that disconnects
    cancels the upstream request (what was produced is still charged); a
    stream that fails after it began ends with an ``{"error": ...}`` event.
    """

    def __init__(self, services: Services, options: Options) -> None:
        self.services = services
        self.options = options
        self.limit = services.config.server.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = cast("HTTPScope", scope)["method"]  # mounted for HTTP only
        if method != "POST":
            return await send_answer(send, not_post(method))
        try:
            started = await self.start(scope, receive)
        except ClientGone:
            return None
        except Exception as exc:
            # The router's exception handlers never see this path (see Gateway): answer for them.
            log.exception("POST /v1/chat/completions failed before it went upstream")
            message = f"chatgate failed before the request went upstream ({type(exc).__name__}); see its log."
            return await send_answer(send, error(500, message, "server_error", None))
        if isinstance(started, Answer):
            return await send_answer(send, started)
        completion, parsed, headers = started
        # A pending receive() returns when the client disconnects (or once the answer is complete).
        watch = asyncio.ensure_future(receive())
        watch.add_done_callback(lambda _: completion.cancel())
        try:
            if parsed.stream:
                await self.stream(send, completion, parsed, headers)
            else:
                await self.whole(send, completion, headers)
        finally:
            watch.cancel()

    async def start(
        self, scope: Scope, receive: Receive
    ) -> Answer | tuple[Completion, wire.Parsed, dict[str, str]]:
        """Authenticate, read, check and route the request, then reserve and start it (or say why not)."""
        services = self.services
        headers = scope_headers(scope)
        try:
            caller = await services.accounts.authenticate_headers(headers)
        except Unauthenticated as exc:
            code = "missing_api_key" if exc.missing else "invalid_api_key"
            return error(401, str(exc), "invalid_request_error", code)
        try:
            raw = await read_body(receive, self.limit, headers.get("content-length"))
        except BodyTooLarge:
            message = f"The request body is larger than this server's limit of {self.limit} bytes."
            return error(413, message, "invalid_request_error", "request_too_large")
        try:
            parsed = wire.parse(raw)
        except wire.Invalid as exc:
            return error(400, exc.message, "invalid_request_error", exc.code, exc.param)
        try:
            route = services.catalog.route(parsed.request.model, headers.get("x-ai-provider"))
        except UnknownProvider as exc:
            return error(400, str(exc), "invalid_request_error", "unknown_provider")
        except UnknownModel:
            message = f"The model '{parsed.request.model}' does not exist or you do not have access to it."
            return error(404, message, "invalid_request_error", "model_not_found", "model")
        if not route.config.vision and (image := wire.first_image(parsed.request)) is not None:
            message = (
                f"The model '{parsed.request.model}' does not take images (its [models] table sets no "
                f"vision = true); remove the image part at '{image}'."
            )
            return error(400, message, "invalid_request_error", "image_not_supported", image)
        limits = self.options.limits_for(caller.key)
        try:
            completion = await services.completions.start(caller, route, parsed.request, limits)
        except RateLimitExceeded as exc:
            return rate_limited(exc, limits)
        except InsufficientBalance as exc:
            return error(403, str(exc), "insufficient_quota", "insufficient_user_quota")
        except OutOfStanding as exc:  # fail closed; the SDKs retry a 503, and the next may land elsewhere
            return error(503, str(exc), "server_error", exc.code, headers={"Retry-After": "1"})
        except ContextTooLong as exc:
            message = (
                f"This model's maximum context length is {route.config.context_tokens} tokens. However, "
                f"your messages resulted in about {exc.tokens} tokens (tools and other fields included). "
                "Please reduce the length of the messages."
            )
            return error(400, message, "invalid_request_error", "context_length_exceeded", "messages")
        return completion, parsed, rate_headers(limits, completion.use)

    async def whole(self, send: Send, completion: Completion, headers: dict[str, str]) -> None:
        try:
            await completion.result()
        except ProviderError as exc:
            return await send_answer(send, provider_error(exc))
        if completion.finish is None:
            return None  # the client left; there is nobody to answer
        body = wire.completion_body(
            wire.Reply(completion.request.model),
            completion.content,
            completion.reasoning,
            list(completion.tool_calls),
            completion.finish,
        )
        await send_answer(send, json_answer(body, headers=headers))

    async def stream(
        self, send: Send, completion: Completion, parsed: wire.Parsed, headers: dict[str, str]
    ) -> None:
        interval = self.options.keepalive_interval
        # Wait for the first event before answering, so a request the upstream
        # refuses gets a real status code instead of a 200 with an error event.
        pending = False
        try:
            event = await completion.next_event(interval)
        except TimeoutError:
            event, pending = None, True
        except ProviderError as exc:
            return await send_answer(send, provider_error(exc))
        await start_stream(send, headers)
        reply = wire.Reply(completion.request.model)
        usage = parsed.include_usage
        out = wire.chunk(reply, {"role": "assistant", "content": ""}, usage=usage)
        try:
            while True:
                if pending:
                    try:
                        event = await completion.next_event(interval)
                    except TimeoutError:
                        await send({"type": "http.response.body", "body": out + KEEPALIVE, "more_body": True})
                        out = b""
                        continue
                    pending = False
                if event is None:
                    break
                # Events that arrived together leave together: one write, not one each.
                out += b"".join([render(reply, e, usage) for e in [event, *completion.ready_events()]])
                await send({"type": "http.response.body", "body": out, "more_body": True})
                out = b""
                event = await completion.next_event()
        except ProviderError as exc:
            out += stream_error(exc)  # too late for a status code
        await send({"type": "http.response.body", "body": out + DONE, "more_body": False})
