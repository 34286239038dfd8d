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
    Caller,
    ChatRequest,
    ClientGone,
    Completion,
    ContextTooLong,
    InsufficientBalance,
    OutOfStanding,
    ProviderError,
    RateLimitExceeded,
    RateLimits,
    Route,
    Services,
    Unauthenticated,
    UnknownModel,
    UnknownProvider,
    json_answer,
    read_body,
    request_headers,
    send_answer,
    start_stream,
)

from . import choices, wire
from .answers import error, provider_error, rate_headers, rate_limited, stream_error
from .chunks import cancel_all, charge_all, opening, render, whole_extras

if TYPE_CHECKING:
    from .options import Options

log = logging.getLogger("chatgate.openai_compat")

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
_READ = frozenset({b"authorization", b"x-api-key", b"x-ai-provider", b"content-length"})


def scope_headers(scope: Scope) -> dict[str, str]:
    """The few request headers this endpoint reads."""
    return request_headers(scope, _READ)


def not_post(method: str) -> Answer:
    """OPTIONS says what is allowed (as Litestar answers it on every other route); the rest are 405."""
    allow = {"Allow": "OPTIONS, POST"}
    if method == "OPTIONS":
        return Answer(204, b"", allow)
    message = f"Method {method} is not allowed on /v1/chat/completions; use POST."
    return error(405, message, "invalid_request_error", None, headers=allow)


async def start_completion(
    services: Services,
    caller: Caller,
    route: Route,
    request: ChatRequest,
    limits: RateLimits,
    *,
    param: str = "messages",
) -> Completion | Answer:
    """Reserve and start ``request`` for ``caller``, or the refusal in OpenAI's shape (the limits,
    the balance, the context; ``param`` names the field that holds the conversation)."""
    started = await start_completions(services, caller, route, request, limits, param=param)
    return started if isinstance(started, Answer) else started[0]


async def receive_request(
    services: Services, scope: Scope, receive: Receive, limit: int
) -> Answer | tuple[Caller, dict[str, str], bytes]:
    """A raw endpoint's first steps, in OpenAI's shape: who the caller is (401 otherwise), before
    its body is read (413 past ``limit``); the caller, the headers read and the body."""
    headers = scope_headers(scope)
    try:
        caller = await services.accounts.authenticate_headers(headers)
    except Unauthenticated as exc:
        code = "missing_api_key" if exc.missing else "invalid_api_key"
        return error(401, str(exc), "invalid_request_error", code)
    try:
        raw = await read_body(receive, limit, headers.get("content-length"))
    except BodyTooLarge:
        message = f"The request body is larger than this server's limit of {limit} bytes."
        return error(413, message, "invalid_request_error", "request_too_large")
    return caller, headers, raw


async def start_completions(
    services: Services,
    caller: Caller,
    route: Route,
    request: ChatRequest,
    limits: RateLimits,
    *,
    count: int = 1,
    param: str = "messages",
) -> list[Completion] | Answer:
    """Reserve and start ``count`` completions of ``request`` (all or none: see
    :meth:`~core.services.completions.Completions.start_many`), or the refusal in OpenAI's shape
    (an embedding model's too: every surface that starts completions here chats)."""
    if route.config.kind != "chat":
        message = (
            f"The model '{request.model}' is an embedding model: it answers POST /v1/embeddings, "
            "not chat completions."
        )
        return error(400, message, "invalid_request_error", "model_not_supported", "model")
    try:
        if count == 1:
            return [await services.completions.start(caller, route, request, limits)]
        if (never := never_admitted(services, route, request, limits, count)) is not None:
            return never
        return await services.completions.start_many(caller, route, request, count, limits)
    except RateLimitExceeded as exc:
        return rate_limited(exc, limits)
    except InsufficientBalance as exc:
        if count > 1:
            message = f"{exc} (this request asked for n = {count} choices, each reserved on its own)"
            return error(403, message, "insufficient_quota", "insufficient_user_quota")
        return error(403, str(exc), "insufficient_quota", "insufficient_user_quota")
    except OutOfStanding as exc:  # fail closed; the SDKs retry a 503, and the next may land elsewhere
        return error(503, str(exc), "server_error", exc.code, headers={"Retry-After": "1"})
    except ContextTooLong as exc:
        message = (
            f"This model's maximum context length is {route.config.context_tokens} tokens. However, "
            f"your {param} resulted in about {exc.tokens} tokens (tools and other fields included). "
            f"Please reduce the length of the {param}."
        )
        return error(400, message, "invalid_request_error", "context_length_exceeded", param)


def never_admitted(
    services: Services, route: Route, request: ChatRequest, limits: RateLimits, count: int
) -> Answer | None:
    """A 400 naming ``n`` and the limit when ``count`` choices could never be admitted together
    under the key's ``limits`` (retrying would not help, so it is no 429); else None.

    Raises: ContextTooLong (the prompt cannot fit the model).
    """
    prompt = services.billing.prompt_tokens(route, request)
    for name, limit, each in (
        ("concurrent_requests", limits.concurrent_requests, 1),
        ("requests_per_minute", limits.requests_per_minute, 1),
        ("tokens_per_minute", limits.tokens_per_minute, prompt),
    ):
        if limit is not None and count * each > limit:
            per = "" if each == 1 else f" of about {each} tokens each"
            message = (
                f"n = {count} choices{per} can never be admitted together: this API key's "
                f"{name} is {limit}. Ask for fewer choices."
            )
            return error(400, message, "invalid_request_error", "n_above_limit", "n")
    return None


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
        completions, parsed, headers = started
        # A pending receive() returns when the client disconnects (or once the answer is complete).
        watch = asyncio.ensure_future(receive())
        watch.add_done_callback(lambda _: cancel_all(completions))
        try:
            if len(completions) > 1:
                if parsed.stream:
                    await choices.stream(send, completions, parsed, headers, self.options.keepalive_interval)
                else:
                    await choices.whole(send, completions, parsed, headers)
            elif parsed.stream:
                await self.stream(send, completions[0], parsed, headers)
            else:
                await self.whole(send, completions[0], parsed, headers)
        finally:
            watch.cancel()
            charge_all(completions)  # n > 1: a settlement no one decided (a failure here) is charged

    async def start(
        self, scope: Scope, receive: Receive
    ) -> Answer | tuple[list[Completion], wire.Parsed, dict[str, str]]:
        """Authenticate, read, check and route the request, then reserve and start it (or say why not)."""
        services = self.services
        received = await receive_request(services, scope, receive, self.limit)
        if isinstance(received, Answer):
            return received
        caller, headers, raw = received
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
        completions = await start_completions(services, caller, route, parsed.request, limits, count=parsed.n)
        if isinstance(completions, Answer):
            return completions
        return completions, parsed, rate_headers(limits, completions[-1].use)

    async def whole(
        self, send: Send, completion: Completion, parsed: wire.Parsed, headers: dict[str, str]
    ) -> None:
        try:
            await completion.result()
        except ProviderError as exc:
            return await send_answer(send, provider_error(exc))
        if completion.finish is None:
            return None  # the client left; there is nobody to answer
        reply = wire.Reply(completion.request.model)
        fingerprint, logprobs = whole_extras(completion, parsed.logprobs)
        reply.saw(fingerprint)
        body = wire.completion_body(
            reply,
            completion.content,
            completion.reasoning,
            list(completion.tool_calls),
            completion.finish,
            logprobs,
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
        usage, logprobs = parsed.include_usage, parsed.logprobs
        # The role chunk goes with the first event, so that it carries the upstream's fingerprint.
        opened = False
        out = b""
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
                if not opened:
                    reply.saw(event.system_fingerprint)
                    out, opened = opening(reply, parsed), True
                # Events that arrived together leave together: one write, not one each.
                out += b"".join(
                    [render(reply, e, usage, logprobs=logprobs) for e in [event, *completion.ready_events()]]
                )
                await send({"type": "http.response.body", "body": out, "more_body": True})
                out = b""
                event = await completion.next_event()
        except ProviderError as exc:
            out += stream_error(exc)  # too late for a status code
        if not opened:
            out = opening(reply, parsed) + out
        await send({"type": "http.response.body", "body": out + DONE, "more_body": False})
