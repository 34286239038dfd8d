"""Stateless completions: one request, billed exactly once, whatever way it ends.

The OpenAI-compatible surface keeps no conversation, so it does not need the
generation runner's persistence; it needs the money right. A
:class:`Completion` reserves the worst case before anything goes upstream,
reads the provider in a task of its own (so a client that disconnects, which
cancels the HTTP handler, cannot interrupt the bookkeeping), and settles the
reservation to the tokens actually produced: the upstream's usage when the
reply finished, an estimate of what was streamed when it did not. A reply is
cut where it passes the output tokens reserved for it (an upstream that
ignores ``max_tokens``), so the reservation is an upper bound. That sequence is
:class:`~core.reply.ReplyRun`'s, shared with stored replies; a completion adds the
queue its reader takes the events from.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from ..records import LedgerEntry, RateLimits
from ..reply import ReplyRun
from ..types import ChatRequest, ProviderEvent, Usage
from .accounts import Caller
from .billing import Billing, Reservation
from .catalog import Route

log = logging.getLogger("chatgate.completions")


class Completion(ReplyRun):
    """One completion in flight.

    Promises: :meth:`next_event` returns the provider's events in order and raises
    the provider's :class:`~core.errors.ProviderError` if it failed;
    :meth:`cancel` (a client gone) stops the upstream at once; the
    reservation is settled exactly once, with outcome ``complete``,
    ``error`` or ``cancelled``, charging the tokens produced and nothing for
    a request that failed before producing any or that was waived (:meth:`waive`); a
    reply that passes the output tokens reserved for it stops there, the upstream closed, and
    finishes as ``length``, charged the reservation. The reply so far is
    :attr:`content`, :attr:`reasoning`, :attr:`tool_calls` and :attr:`finish`.
    """

    log = log
    # A stream that ends unfinished has always ended a completion as it stood (no finish).
    require_finish = False

    def __init__(
        self,
        billing: Billing,
        route: Route,
        request: ChatRequest,
        reservation: Reservation,
        *,
        hold_settlement: bool = False,
    ) -> None:
        super().__init__(billing, route, request, reservation, time.monotonic())
        # With hold_settlement, the reply settles only once charge() or waive() says how
        # (the choices of one n > 1 reply: a refused reply costs nothing, whichever choice failed).
        self._verdict: asyncio.Future[bool] | None = (
            asyncio.get_running_loop().create_future() if hold_settlement else None
        )
        self.use = reservation.use
        self._entry_id = reservation.entry.id
        self._ready: deque[ProviderEvent] = deque()  # produced, not yet taken by next_event
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._end = asyncio.Event()
        self._begun = False
        self._stop_first = False
        self._task = asyncio.create_task(self._run(), name=f"completion {route.model}")

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

    def _publish(self, event: ProviderEvent) -> None:
        self._ready.append(event)
        if self._waiter is not None:
            self._wake()

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
        if not self._begun:
            # A task cancelled before its first step never runs: its reservation would stay
            # held and result() would wait for ever. It starts, sees this, and ends cancelled.
            self._stop_first = True
        elif not self._ended:  # once the reply has ended, only its settlement is left: let it finish
            self._task.cancel()

    def charge(self) -> None:
        """Settle for what the reply produced (a held settlement's usual verdict; no-op otherwise
        or once decided)."""
        if self._verdict is not None and not self._verdict.done():
            self._verdict.set_result(True)

    def waive(self) -> None:
        """Nothing of this reply reached the client (it got an error status for the request as a
        whole): stop the reply and settle it at zero, whatever it produced.

        Only a completion started with a held settlement (:meth:`Completions.start_many`) can
        still be waived: another one may have settled already, and is left as it is. A no-op once
        :meth:`charge` or :meth:`waive` decided.
        """
        if self._verdict is not None and not self._verdict.done():
            self._verdict.set_result(False)
            self.cancel()

    async def _run(self) -> None:
        self._begun = True
        try:
            if self._stop_first:
                self.end = "cancelled"  # nothing went upstream, so nothing is charged
            else:
                await self.pump()
        finally:
            self._ended = True
            self._wake()
            self._end.set()
        usage = self.usage()
        if self._verdict is not None:
            try:
                if not await asyncio.shield(self._verdict):
                    usage = Usage()  # waived: a refused request costs nothing
            except asyncio.CancelledError:
                pass  # shutting down before the answer was decided: charged what it produced
        try:
            await self.settle(usage)
        except Exception:
            # The reservation stays held (the balance errs on the safe side); the log says which.
            log.exception("could not settle ledger entry %d", self._entry_id)


class Completions:
    """Starts stateless completions for surfaces that keep no conversation."""

    def __init__(self, billing: Billing) -> None:
        self.billing = billing
        self._running: set[asyncio.Task[None]] = set()
        self._releasing: set[asyncio.Future[list[LedgerEntry | None]]] = set()

    async def aclose(self) -> None:
        """At shutdown: stop the replies still running and wait until every one is settled."""
        for task in self._running:
            task.cancel()
        if self._running:
            await asyncio.wait(self._running, timeout=10)
        if self._releasing:  # reservations of refused n > 1 requests being given back
            await asyncio.wait(self._releasing, timeout=10)

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
        return self._begin(route, request, reservation)

    async def start_many(
        self, caller: Caller, route: Route, request: ChatRequest, count: int, limits: RateLimits | None = None
    ) -> list[Completion]:
        """``count`` completions of the same request (OpenAI's ``n``), each reserved, settled and
        charged on its own ledger entry; all or none. Each settles only once the caller
        decides with :meth:`Completion.charge` or :meth:`Completion.waive` (call one of them on
        every completion, whatever happens: a ``finally``), so a reply refused as a whole costs
        nothing even when some choices finished.

        Every reservation is made before any request goes upstream: when one is refused, the
        ones made before it are released untouched (nothing charged; their entries say
        ``not_sent`` and no longer count against the key's limits) and its refusal is raised,
        so a caller whose balance or limits cannot cover all ``count`` never starts some of them.

        Raises: what :meth:`start` raises.
        """
        key_id = caller.key.id if caller.key is not None else None
        reservations: list[Reservation] = []
        try:
            for _ in range(count):
                reservation = await self.billing.reserve(
                    caller.user.id, route, request, key_id=key_id, limits=limits, balance=caller.user.balance
                )
                reservations.append(reservation)
        except BaseException:  # a refusal, or the client gone: give back what was held
            if reservations:
                releases = asyncio.gather(*(self.billing.release(r, uncount=True) for r in reservations))
                self._releasing.add(releases)
                releases.add_done_callback(self._releasing.discard)
                await asyncio.shield(releases)
            raise
        return [self._begin(route, request, r, hold_settlement=True) for r in reservations]

    def _begin(
        self, route: Route, request: ChatRequest, reservation: Reservation, *, hold_settlement: bool = False
    ) -> Completion:
        completion = Completion(self.billing, route, request, reservation, hold_settlement=hold_settlement)
        # Tracked until settled: answers no longer wait for the ledger, shutdown does.
        self._running.add(completion._task)
        completion._task.add_done_callback(self._running.discard)
        return completion
