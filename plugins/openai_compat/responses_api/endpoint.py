"""``POST /v1/responses`` as a raw ASGI app, like the chat endpoint (``..endpoint``).

It is as busy a path as the chat, so it reads its headers from the scope, answers a
whole reply in one write and watches the connection itself: a client that leaves
cancels the upstream request, and what was produced is still charged, once. The
refusals are the chat endpoint's, in OpenAI's error body; a stored response's
conversation is made while the upstream starts answering, so storing costs the reply
no waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, cast

import msgspec
from litestar.types import HTTPScope, Receive, Scope, Send

from core import (
    Answer,
    ClientGone,
    Completion,
    ContextTooLong,
    Finish,
    ProviderError,
    Services,
    UnknownModel,
    UnknownProvider,
    estimate_request_tokens,
    json_answer,
    send_answer,
    start_stream,
    upstream_plugin,
)

from ..answers import error, provider_error, rate_headers
from ..endpoint import KEEPALIVE, receive_request, start_completion
from ..wire import Invalid
from . import wire
from .events import ResponseEvents
from .saved import MAX_CHAIN, ChainTooLong, Missing, Saved, Slot, unstored_id
from .sweep import Sweeper

if TYPE_CHECKING:
    from ..options import Options

log = logging.getLogger("chatgate.openai_compat.responses")


def not_found(response_id: str, param: str | None = "previous_response_id") -> Answer:
    """The refusal of an unknown ``previous_response_id`` (dialects.md B.8)."""
    message = f"Previous response with id '{response_id}' not found."
    return error(400, message, "invalid_request_error", "previous_response_not_found", param)


def not_post(method: str) -> Answer:
    allow = {"Allow": "OPTIONS, POST"}
    if method == "OPTIONS":
        return Answer(204, b"", allow)
    message = (
        f"Method {method} is not allowed on /v1/responses; use POST (GET and DELETE take /v1/responses/ID)."
    )
    return error(405, message, "invalid_request_error", None, headers=allow)


class Started:
    """A response whose reply is running: what the answer needs."""

    __slots__ = ("completion", "created_at", "headers", "kept", "parsed", "slot")

    def __init__(
        self,
        completion: Completion,
        parsed: wire.Parsed,
        headers: dict[str, str],
        slot: asyncio.Future[Slot] | None,
    ) -> None:
        self.completion = completion
        self.parsed = parsed
        self.headers = headers
        self.slot = slot
        self.created_at = int(time.time())
        self.kept = False  # saved (or not to be): its conversation stays


class Responses:
    """The ASGI app of ``POST /v1/responses``.

    Promises: every refusal is OpenAI's error body naming the bad field; nothing goes
    upstream, and nothing is charged, before the key, the body, the stored context and
    the limits have passed; an unknown ``previous_response_id`` is 400
    ``previous_response_not_found``; a stream starts with ``response.created`` and ends
    with exactly one of ``response.completed``, ``.incomplete`` or ``.failed``; a stored
    response is saved before the client hears it ended, so a follow-up may chain at once;
    a client that disconnects cancels the upstream request.
    """

    def __init__(self, services: Services, options: Options) -> None:
        self.services = services
        self.options = options
        self.limit = services.config.server.max_body_bytes
        self.saved = Saved(services, options.responses_retention_days)
        self.sweeper = Sweeper(services.conversations.store, self.saved.retention)

    async def open(self) -> None:
        """Start the periodic sweep of expired and abandoned stored responses."""
        self.sweeper.start()

    async def aclose(self) -> None:
        await self.sweeper.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = cast("HTTPScope", scope)["method"]
        if method != "POST":
            return await send_answer(send, not_post(method))
        try:
            started = await self.start(scope, receive)
        except ClientGone:
            return None
        except Exception as exc:
            log.exception("POST /v1/responses failed before it went upstream")
            message = f"chatgate failed before the request went upstream ({type(exc).__name__}); see its log."
            return await send_answer(send, error(500, message, "server_error", None))
        if isinstance(started, Answer):
            return await send_answer(send, started)
        completion = started.completion
        watch = asyncio.ensure_future(receive())
        watch.add_done_callback(lambda _: completion.cancel())
        try:
            if started.parsed.stream:
                await self.stream(send, started, watch)
            else:
                await self.whole(send, started)
        finally:
            watch.cancel()
            if started.slot is not None and not started.kept:
                # Refused by the upstream, or abandoned by its client (a send to it may have
                # raised): the response was never answered, so its conversation goes.
                await asyncio.shield(self._discard(started))

    async def start(self, scope: Scope, receive: Receive) -> Answer | Started:
        """Authenticate, read, check, load the context and route, then reserve and start (or say why not)."""
        services = self.services
        received = await receive_request(services, scope, receive, self.limit)
        if isinstance(received, Answer):
            return received
        caller, headers, raw = received
        try:
            body, model = wire.load(raw)
        except Invalid as exc:
            return error(400, exc.message, "invalid_request_error", exc.code, exc.param)
        route = None
        try:
            route = services.catalog.route(model, headers.get("x-ai-provider"))
        except UnknownProvider as exc:
            return error(400, str(exc), "invalid_request_error", "unknown_provider")
        except UnknownModel:
            pass  # the body is checked first: a bad field is named before the model is refused
        try:
            parsed = wire.parse_body(body, model, upstream_plugin(route) if route is not None else None)
        except Invalid as exc:
            return error(400, exc.message, "invalid_request_error", exc.code, exc.param)
        if route is None:
            message = f"The model '{parsed.request.model}' does not exist or you do not have access to it."
            return error(404, message, "invalid_request_error", "model_not_found", "model")
        if not route.config.vision and parsed.image is not None:
            message = (
                f"The model '{parsed.request.model}' does not take images (its [models] table sets no "
                f"vision = true); remove the image part at '{parsed.image}'."
            )
            return error(400, message, "invalid_request_error", "image_not_supported", parsed.image)
        if route.config.kind != "chat":
            message = (
                f"The model '{parsed.request.model}' is an embedding model: it answers POST /v1/embeddings, "
                "not responses."
            )
            return error(400, message, "invalid_request_error", "model_not_supported", "model")
        if parsed.store and not self.options.store_responses:  # the operator keeps none
            echo = {**parsed.echo, "store": False}
            parsed = msgspec.structs.replace(parsed, store=False, echo=echo)
        context = []
        if parsed.previous_response_id is not None:
            budget = route.config.context_tokens
            try:
                # What the request adds to the chain counts from the start: the walk stops
                # as soon as the whole could not fit.
                spent = estimate_request_tokens(wire.chat_request(parsed, []))
                context = await self.saved.chain(caller.user.id, parsed.previous_response_id, budget, spent)
            except ContextTooLong as exc:
                message = (
                    f"This model's maximum context length is {budget} tokens. However, your input and "
                    f"the responses its previous_response_id chains resulted in at least {exc.tokens} "
                    "tokens. Start a new chain, or reduce the length of the input."
                )
                return error(400, message, "invalid_request_error", "context_length_exceeded", "input")
            except Missing as exc:
                return not_found(exc.response_id)
            except ChainTooLong:
                message = (
                    f"Invalid 'previous_response_id': its chain of responses is longer than chatgate follows "
                    f"({MAX_CHAIN} responses). Start a new chain, sending the context you need as input."
                )
                return error(400, message, "invalid_request_error", "previous_response_chain_too_long",
                             "previous_response_id")  # fmt: skip
            except Invalid as exc:  # a stored item chatgate cannot read back (never written so)
                return error(400, exc.message, "invalid_request_error", exc.code, "previous_response_id")
        request = wire.chat_request(parsed, context)
        if not request.messages:
            return error(400, "Missing required parameter: 'input'.", "invalid_request_error",
                         "missing_required_parameter", "input")  # fmt: skip
        limits = self.options.limits_for(caller.key)
        completion = await start_completion(services, caller, route, request, limits, param="input")
        if isinstance(completion, Answer):
            return completion
        # The conversation is made while the upstream starts answering (nothing at all when
        # the response is not stored: that is the path a translation's cost is measured on).
        slot = None
        if parsed.store:
            slot = asyncio.ensure_future(self.saved.slot(caller.user.id, parsed.previous_response_id))
        return Started(completion, parsed, rate_headers(limits, completion.use), slot)

    async def _slot(self, started: Started) -> Slot | None:
        """The response's conversation, once made; None when it is not stored (or could not be
        made: the reply was paid for, so it is answered all the same, and the log says why it
        cannot be found later)."""
        if started.slot is None:
            return None
        try:
            return await started.slot
        except Exception:
            log.exception("POST /v1/responses could not make the conversation of its response")
            started.slot = None
            return None

    async def _response_id(self, started: Started) -> str:
        """The id the response answers under: its conversation's, or one never found later."""
        slot = await self._slot(started)
        return slot.response_id if slot is not None else unstored_id()

    async def _discard(self, started: Started) -> None:
        """The reply was refused or abandoned before its answer: its conversation goes."""
        slot = await self._slot(started)
        if slot is None:
            return
        try:
            await self.saved.discard(slot)
        except Exception:
            log.exception("could not discard the conversation of an unanswered response")

    async def _save(self, started: Started, body: dict[str, Any]) -> None:
        """Keep the response (when asked to); a store failure is logged, and the answer goes out:
        the reply was paid for."""
        slot = await self._slot(started)
        if slot is None:
            return
        try:
            await self.saved.save(slot, started.parsed, body, started.completion.request.model)
            started.kept = True
        except Exception:
            log.exception("POST /v1/responses could not store response %s", slot.response_id)

    async def whole(self, send: Send, started: Started) -> None:
        completion = started.completion
        try:
            await completion.result()
        except ProviderError as exc:
            return await send_answer(send, provider_error(exc))
        finish = completion.finish
        if finish is None:
            return None  # the client left; there is nobody to answer
        response_id = await self._response_id(started)
        body = self.whole_body(started, response_id, finish)
        await self._save(started, body)
        await send_answer(send, json_answer(body, headers=started.headers))

    @staticmethod
    def whole_body(started: Started, response_id: str, finish: Finish) -> dict[str, Any]:
        completion, parsed = started.completion, started.parsed
        status, reason = wire.FINISHED.get(finish.reason, ("failed", None))
        failure = None
        if status == "failed":
            failure = {
                "code": "server_error",
                "message": f"The model's server could not finish the reply ({finish.reason}).",
            }
        # The calls from the events (all still waiting: a whole reply takes none), so that an
        # upstream reusing an index for parallel calls makes the calls a stream shows.
        calls = wire.gathered_calls(completion.ready_events())
        output = wire.output_items(completion.reasoning, completion.content, calls, status, parsed.summary)
        return wire.response_body(
            response_id,
            started.created_at,
            parsed.request.model,
            parsed.echo,
            status=status,
            output=output,
            usage=finish.usage,
            error=failure,
            incomplete=reason,
        )

    async def stream(self, send: Send, started: Started, watch: asyncio.Future[Any]) -> None:
        completion = started.completion
        interval = self.options.keepalive_interval
        # Wait for the first event before answering, so a request the upstream refuses gets a
        # real status code instead of a 200 whose first event is a failure.
        pending = False
        try:
            event = await completion.next_event(interval)
        except TimeoutError:
            event, pending = None, True
        except ProviderError as exc:
            return await send_answer(send, provider_error(exc))
        response_id = await self._response_id(started)
        await start_stream(send, started.headers)
        parsed = started.parsed
        events = ResponseEvents(
            response_id, started.created_at, parsed.request.model, parsed.echo, parsed.summary
        )
        out = events.opening()
        finish: Finish | None = None
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
                batch = [event, *completion.ready_events()]
                tail = batch[-1]
                if isinstance(tail, Finish):  # a reply's last event (feed would skip it too)
                    finish = tail
                    batch.pop()
                out += b"".join([events.feed(each) for each in batch])
                await send({"type": "http.response.body", "body": out, "more_body": True})
                out = b""
                event = await completion.next_event()
        except ProviderError as exc:
            closing, last = events.fail(exc.message)  # too late for a status code
        else:
            if finish is None:
                if watch.done():
                    return None  # the client left: nobody to answer
                closing, last = events.fail("The model's server ended the reply before it finished.")
            else:
                closing, last = events.finish(finish)
        assert events.body is not None
        await self._save(started, events.body)
        await send({"type": "http.response.body", "body": out + closing + last, "more_body": False})
