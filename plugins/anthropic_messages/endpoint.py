"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens`` as raw ASGI apps.

Like the OpenAI surface's chat endpoint (plugins/openai_compat/endpoint.py),
this is a hot path: it skips Litestar's request and response objects, reads
the few headers it needs from the scope, answers a whole reply in one write,
and watches the connection itself so a client that leaves cancels the
upstream request. The query string plays no part (Claude Code and the SDKs'
beta client call ``/v1/messages?beta=true``). Every refusal is Anthropic's
error body with the status its cause stands for (research/dialects.md A.11).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, cast

from litestar.types import HTTPScope, Receive, Scope, Send

from core import (
    Answer,
    AuthenticationFailed,
    BodyTooLarge,
    Caller,
    ChatRequest,
    ClientGone,
    Completion,
    ContextTooLong,
    InsufficientBalance,
    OutOfStanding,
    ProviderError,
    RateLimited,
    RateLimitExceeded,
    Route,
    Services,
    Timeout,
    ToolCallDelta,
    Unauthenticated,
    Unavailable,
    UnknownModel,
    UnknownProvider,
    UpstreamBalanceExhausted,
    estimate_request_tokens,
    json_answer,
    read_body,
    request_headers,
    send_answer,
    start_stream,
    upstream_plugin,
)

from . import events, wire

if TYPE_CHECKING:
    from .options import Options

log = logging.getLogger("chatgate.anthropic_messages")

_READ = frozenset({b"authorization", b"x-api-key", b"x-ai-provider", b"content-length"})


def error(
    status: int, message: str, headers: dict[str, str] | None = None, type_: str | None = None
) -> Answer:
    """Anthropic's error body for ``status`` (``error.type`` ``type_``, by default the status's own),
    with a ``request-id``."""
    rid = wire.request_id()
    body = wire.error_body(type_ or wire.error_type(status), message, rid)
    return json_answer(body, status, {"request-id": rid, **(headers or {})})


def provider_error(exc: ProviderError, charged: bool = False) -> Answer:
    """An upstream failure before anything was sent to the client: the SDKs' retryable statuses stay
    retryable, unless retrying cannot help (the operator's upstream key or balance) or the failed
    reply was ``charged`` (it produced something first): a retry the client did not choose must not
    make it pay twice, so ``x-should-retry: false``, which the SDKs obey before the status."""
    headers = {}
    if exc.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(exc.retry_after)))
    if charged or isinstance(exc, (AuthenticationFailed, UpstreamBalanceExhausted)):
        headers["x-should-retry"] = "false"
    if isinstance(exc, RateLimited):
        return error(429, exc.message, headers)
    if isinstance(exc, Timeout):
        return error(504, exc.message, headers)
    if isinstance(exc, Unavailable):
        return error(529, exc.message, headers)  # Anthropic's "overloaded": the SDKs retry it
    return error(exc.status, exc.message, headers)


def stream_error(exc: ProviderError) -> bytes:
    """The ``event: error`` of a stream that failed after it began."""
    if isinstance(exc, RateLimited):
        type_ = "rate_limit_error"
    elif isinstance(exc, Timeout):
        type_ = "timeout_error"
    elif isinstance(exc, Unavailable):
        type_ = "overloaded_error"
    else:
        type_ = wire.error_type(exc.status)
    return events.error_event(type_, exc.message)


def not_post(method: str, path: str) -> Answer:
    """OPTIONS says what is allowed (as Litestar answers it on every other route); the rest are 405."""
    allow = {"Allow": "OPTIONS, POST"}
    if method == "OPTIONS":
        return Answer(204, b"", allow)
    return error(405, f"Method {method} is not allowed on {path}; use POST.", allow)


class Checked(NamedTuple):
    """A request that passed every check: who asked, where it goes, what goes there."""

    caller: Caller
    route: Route
    request: ChatRequest
    stream: bool
    names: dict[str, str]


class Started(NamedTuple):
    """A completion under way, whether the client wants it streamed, the headers of its answer,
    and the tool names to give back (see :attr:`wire.Translated.names`)."""

    completion: Completion
    stream: bool
    headers: dict[str, str]
    names: dict[str, str]


class Endpoint:
    """What both endpoints share: the key, the body, the route (``count``: a count_tokens body)."""

    count = False
    path = "/v1/messages"

    def __init__(self, services: Services, options: Options) -> None:
        self.services = services
        self.options = options
        self.limit = services.config.server.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = cast("HTTPScope", scope)["method"]  # mounted for HTTP only
        if method != "POST":
            return await send_answer(send, not_post(method, self.path))
        try:
            started = await self.start(scope, receive)
        except ClientGone:
            return None
        except Exception as exc:
            # The router's exception handlers never see this path (see core.app.Gateway): answer for them.
            log.exception("POST %s failed before it went upstream", self.path)
            message = f"chatgate failed before the request went upstream ({type(exc).__name__}); see its log."
            return await send_answer(send, error(500, message))
        if isinstance(started, Answer):
            return await send_answer(send, started)
        await self.reply(receive, send, started)

    async def start(self, scope: Scope, receive: Receive) -> Answer | Started:
        """Check the request and start it, or the answer that says why not (or all it needs)."""
        raise NotImplementedError

    async def reply(self, receive: Receive, send: Send, started: Started) -> None:
        """Answer a request that :meth:`start` started."""
        raise NotImplementedError

    async def checked(self, scope: Scope, receive: Receive) -> Answer | Checked:
        """Authenticate, read, check and route the request (or say why not)."""
        services = self.services
        headers = request_headers(scope, _READ)
        try:
            caller = await services.accounts.authenticate_headers(headers)
        except Unauthenticated as exc:
            return error(401, str(exc))
        try:
            raw = await read_body(receive, self.limit, headers.get("content-length"))
        except BodyTooLarge:
            return error(413, f"The request body is larger than this server's limit of {self.limit} bytes.")
        try:
            body = wire.parse(raw, count=self.count)
        except wire.Invalid as exc:
            return error(400, exc.message)
        try:
            route = services.catalog.route(body.model, headers.get("x-ai-provider"))
        except UnknownProvider as exc:
            return error(400, str(exc))
        except UnknownModel:
            return error(404, f"model: {body.model}")
        if route.config.kind != "chat":
            return error(
                400,
                f"model: '{body.model}' is an embedding model: it answers POST /v1/embeddings, not messages",
            )
        try:
            stream = isinstance(body, wire.MessagesRequest) and body.stream
            # The upstream's dialect decides how `thinking` is asked for (core.reasoning).
            translated = wire.to_chat(body, stream=stream, plugin=upstream_plugin(route))
        except wire.Invalid as exc:
            return error(400, exc.message)
        if translated.image is not None and not route.config.vision:
            return error(
                400,
                f"{translated.image}: the model '{body.model}' does not take images (its [models] table "
                "sets no vision = true); remove the image block",
            )
        return Checked(caller, route, translated.request, stream, translated.names)


class Messages(Endpoint):
    """The ASGI app of ``POST /v1/messages``.

    Promises: every refusal is Anthropic's error body with the status its cause
    stands for; nothing goes upstream, and nothing is charged, before the key, the
    body and the limits have passed; a client that disconnects cancels the upstream
    request (what was produced is still charged, once); a stream waits for the
    upstream's first event, so a refusal still gets its status, and one that fails
    after it began ends with an ``event: error``; a whole reply that failed after it
    produced something (charged) answers ``x-should-retry: false``, so no SDK pays
    for it twice; a reply the upstream cut short but finished is a success.
    """

    async def reply(self, receive: Receive, send: Send, started: Started) -> None:
        completion, stream, headers, names = started
        # A pending receive() returns when the client disconnects (or once the answer is complete).
        watch = asyncio.ensure_future(receive())
        watch.add_done_callback(lambda _: completion.cancel())
        try:
            if stream:
                await self.stream(send, completion, headers, names)
            else:
                await self.whole(send, completion, headers, names)
        finally:
            watch.cancel()

    async def start(self, scope: Scope, receive: Receive) -> Answer | Started:
        """Check the request, then reserve and start it (or say why not)."""
        checked = await self.checked(scope, receive)
        if isinstance(checked, Answer):
            return checked
        services, caller, route = self.services, checked.caller, checked.route
        limits = services.accounts.limits_for(caller.key)
        try:
            completion = await services.completions.start(caller, route, checked.request, limits)
        except RateLimitExceeded as exc:
            wait = max(exc.retry_after, 0.001)
            retry = {
                "retry-after": str(max(1, math.ceil(wait))),
                "retry-after-ms": str(math.ceil(wait * 1000)),
            }
            return error(429, f"Rate limit reached on this API key: {exc}", retry)
        except InsufficientBalance as exc:
            # Topping up is a person's job: retrying cannot help (research A.2, x-should-retry).
            return error(402, f"Your credit balance is too low: {exc}", {"x-should-retry": "false"})
        except OutOfStanding as exc:  # fail closed; the SDKs retry a 503, and the next may land elsewhere
            return error(503, str(exc), {"retry-after": "1"}, "overloaded_error")
        except ContextTooLong as exc:
            limit = route.config.context_tokens
            return error(400, f"prompt is too long: {exc.tokens} tokens > {limit - 1} maximum")
        return Started(completion, checked.stream, {"request-id": wire.request_id()}, checked.names)

    async def whole(
        self, send: Send, completion: Completion, headers: dict[str, str], names: dict[str, str]
    ) -> None:
        try:
            await completion.result()
        except ProviderError as exc:
            return await send_answer(send, provider_error(exc, charged(completion)))
        finish = completion.finish
        if finish is None:
            return None  # the client left; there is nobody to answer
        # Whatever the finish: a reply cut short (DeepSeek's insufficient_system_resource) is paid
        # for, so the client gets it as a success (end_turn), as the chat surface passes it on.
        calls: Sequence[ToolCallDelta] = completion.tool_calls
        if calls:
            # Core gathers calls by index; an upstream that reuses index 0 for every call needs
            # the events themselves, all still waiting here (nothing took them from the queue).
            calls = wire.gather_calls(completion.ready_events())
        body = wire.message_body(
            completion.request.model, completion.content, completion.reasoning, calls, finish, names
        )
        await send_answer(send, json_answer(body, headers=headers))

    async def stream(
        self, send: Send, completion: Completion, headers: dict[str, str], names: dict[str, str]
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
            return await send_answer(send, provider_error(exc, charged(completion)))
        await start_stream(send, headers)
        blocks = events.Blocks(completion.request.model, names)
        out = blocks.start(completion.prompt_tokens)
        try:
            while True:
                if pending:
                    try:
                        event = await completion.next_event(interval)
                    except TimeoutError:
                        await send(
                            {"type": "http.response.body", "body": out + events.PING, "more_body": True}
                        )
                        out = b""
                        continue
                    pending = False
                if event is None:
                    break
                # Events that arrived together leave together: one write, not one each.
                feed = blocks.feed
                out += b"".join([feed(e) for e in [event, *completion.ready_events()]])
                await send({"type": "http.response.body", "body": out, "more_body": True})
                out = b""
                event = await completion.next_event()
        except ProviderError as exc:
            out += stream_error(exc)  # too late for a status code
        else:
            if not blocks.finished:
                out += events.error_event("api_error", "the upstream ended the reply without finishing it")
        await send({"type": "http.response.body", "body": out, "more_body": False})


def charged(completion: Completion) -> bool:
    """Whether a completion that failed is charged all the same: it produced something first."""
    usage = completion.usage()
    return usage.prompt_tokens > 0 or usage.completion_tokens > 0


class CountTokens(Endpoint):
    """The ASGI app of ``POST /v1/messages/count_tokens``: ``{"input_tokens": N}``.

    Promises: the same key and the same checks as ``/v1/messages`` (but for
    ``max_tokens``), nothing charged or sent upstream; ``N`` is core's estimate of
    the whole request (messages, system prompt, tools), the one admission and the
    context budget use, which errs high (research A.12: counting low makes Claude
    Code compact too late).
    """

    count = True
    path = "/v1/messages/count_tokens"

    async def start(self, scope: Scope, receive: Receive) -> Answer | Started:
        checked = await self.checked(scope, receive)
        if isinstance(checked, Answer):
            return checked
        return json_answer({"input_tokens": estimate_request_tokens(checked.request)})
