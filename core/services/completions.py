"""Stateless completions: one request, billed exactly once, whatever way it ends.

The OpenAI-compatible surface keeps no conversation, so it does not need the
generation runner's persistence; it needs the money right. A
:class:`Completion` reserves the worst case before anything goes upstream,
reads the provider in a task of its own (so a client that disconnects, which
cancels the HTTP handler, cannot interrupt the bookkeeping), and settles the
reservation to the tokens actually produced: the upstream's usage when the
reply finished, an estimate of what was streamed when it did not. A reply is
cut where it passes the output tokens reserved for it (an upstream that
ignores ``max_tokens``), so the reservation is an upper bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from contextlib import aclosing

from ..errors import ProviderError
from ..provider import merge_tool_call
from ..records import RateLimits
from ..tokens import OutputMeter, estimate_tokens
from ..types import (
    ChatRequest,
    ContentDelta,
    Finish,
    ProviderEvent,
    ReasoningDelta,
    ToolCallDelta,
    Usage,
)
from .accounts import Caller
from .billing import Billing, Reservation
from .catalog import Route

log = logging.getLogger("chatgate.completions")


class Completion:
    """One completion in flight.

    Promises: :meth:`next_event` returns the provider's events in order and raises
    the provider's :class:`~core.errors.ProviderError` if it failed;
    :meth:`cancel` (a client gone) stops the upstream at once; the
    reservation is settled exactly once, with outcome ``complete``,
    ``error`` or ``cancelled``, charging the tokens produced and nothing for
    a request that failed before producing any; a reply that passes the
    output tokens reserved for it stops there, the upstream closed, and
    finishes as ``length``, charged the reservation.
    """

    def __init__(
        self, billing: Billing, route: Route, request: ChatRequest, reservation: Reservation
    ) -> None:
        self.route = route
        self.request = request
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, ToolCallDelta] = {}
        self.finish: Finish | None = None
        self.error: ProviderError | None = None
        self._billing = billing
        self._reservation = reservation
        self.use = reservation.use
        self._ready: deque[ProviderEvent] = deque()  # produced, not yet taken by next_event
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._end = asyncio.Event()
        self._started = time.monotonic()
        self._task = asyncio.create_task(self._pump(), name=f"completion {route.model}")

    async def next_event(self, timeout: float | None = None) -> ProviderEvent | None:  # noqa: ASYNC109
        """The next event, or None at the end; ``TimeoutError`` when none came within ``timeout``."""
        while not self._ready:
            if self._ended:  # the end stays the end for later calls
                if self.error is not None:
                    raise self.error
                return None
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            if timeout is None:
                await waiter
            else:
                await asyncio.wait_for(waiter, timeout)
        return self._ready.popleft()

    def ready_events(self) -> list[ProviderEvent]:
        """The events already waiting, without waiting for more."""
        ready = list(self._ready)
        self._ready.clear()
        return ready

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def result(self) -> Completion:
        """Wait for the whole reply; raise the provider's error if it failed.

        The reply is complete before its settlement is written, so the caller can
        answer without waiting for the ledger.
        """
        await self._end.wait()
        if self.error is not None:
            raise self.error
        return self

    def cancel(self) -> None:
        """Stop the reply (its consumer is gone); what it produced is still charged."""
        if not self._ended:  # once the reply has ended, only its settlement is left: let it finish
            self._task.cancel()

    @property
    def text(self) -> str:
        return "".join(self.content)

    async def _pump(self) -> None:
        outcome = "complete"
        meter = OutputMeter(self.route.output_tokens(self.request))
        try:
            async with aclosing(self.route.stream(self.request)) as stream:
                async for event in stream:
                    if (admitted := meter.admit(event)) is None:
                        break
                    event = admitted
                    match event:
                        case ContentDelta(text=text):
                            self.content.append(text)
                        case ReasoningDelta(text=text):
                            self.reasoning.append(text)
                        case ToolCallDelta() as part:
                            self.tool_calls[part.index] = merge_tool_call(
                                self.tool_calls.get(part.index), part
                            )
                        case Finish():
                            self.finish = event
                    self._ready.append(event)
                    self._wake()
                    if meter.over:
                        break
            if meter.over:  # the upstream is closed: what it would have sent past the cap is not read
                prompt = self._reservation.prompt_tokens
                self.finish = meter.cut(prompt, self.route.provider.instance, self.route.model)
                self._ready.append(self.finish)
                self._wake()
        except asyncio.CancelledError:
            outcome = "cancelled"  # not re-raised: this task owns the bookkeeping, and ends with it
        except ProviderError as exc:
            outcome = "error"
            self.error = exc
        except Exception as exc:  # a provider breaking its contract must not lose the money
            log.exception("provider %r failed unexpectedly", self.route.provider.instance)
            outcome = "error"
            self.error = ProviderError(
                f"provider {self.route.provider.instance!r} failed unexpectedly: {exc!r}"
            )
        finally:
            self._ended = True
            self._wake()
            self._end.set()
        await self._settle(outcome)

    async def _settle(self, outcome: str) -> None:
        if self.finish is not None:
            usage = self.finish.usage
        else:
            produced = "".join(self.content) + "".join(self.reasoning)
            produced += "".join(c.arguments for c in self.tool_calls.values())
            completion_tokens = estimate_tokens(produced) if produced else 0
            # Nothing produced: the upstream answered with an error, and nothing is charged.
            prompt_tokens = self._reservation.prompt_tokens if completion_tokens else 0
            usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        latency_ms = round((time.monotonic() - self._started) * 1000)
        try:
            self.ledger_entry = await self._billing.settle(
                self._reservation, usage, outcome=outcome, latency_ms=latency_ms
            )
        except Exception:
            # The reservation stays held (the balance errs on the safe side); the log says which.
            log.exception("could not settle ledger entry %d", self._reservation.entry.id)


class Completions:
    """Starts stateless completions for surfaces that keep no conversation."""

    def __init__(self, billing: Billing) -> None:
        self.billing = billing
        self._running: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        """At shutdown: stop the replies still running and wait until every one is settled."""
        for task in self._running:
            task.cancel()
        if self._running:
            await asyncio.wait(self._running, timeout=10)

    async def start(
        self, caller: Caller, route: Route, request: ChatRequest, limits: RateLimits | None = None
    ) -> Completion:
        """Reserve the worst-case cost on the caller's balance (within ``limits``), then start the reply.

        Raises:
            RateLimitExceeded: the caller's key is at one of its limits; nothing went upstream.
            InsufficientBalance: the balance cannot cover the worst case; nothing went upstream.
            ContextTooLong: the request cannot fit the model's context; nothing was reserved.
        """
        key_id = caller.key.id if caller.key is not None else None
        reservation = await self.billing.reserve(
            caller.user.id, route, request, key_id=key_id, limits=limits, balance=caller.user.balance
        )
        completion = Completion(self.billing, route, request, reservation)
        # Tracked until settled: answers no longer wait for the ledger, shutdown does.
        self._running.add(completion._task)
        completion._task.add_done_callback(self._running.discard)
        return completion
