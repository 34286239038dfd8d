"""Leases: admitting a busy key's requests without a store call each.

A lease is one reservation that stands for up to ``size`` requests of a key:
their worst-case cost, their estimated prompt tokens and as many concurrent
slots. It is posted through the store's admission like any reservation, so it
passes the same rate limits and the same balance floor, exactly, across every
process sharing the store. This process then admits the key's requests
against it in memory, and posts each request's charge (an entry of its own,
as before) in one write with the others that ended meanwhile. A lease is
released, giving back the money, requests and tokens it did not use, once it
is used up, idle for ``idle`` seconds or older than ``max_age``, and at
shutdown; a lease a crashed process left is released by the sweep of stale
reservations.

Why: the store round trip of each admission was 40% of the latency chatgate
added at concurrency 1 and a third of its CPU at 16 (``bench/openai_overhead.py``).

What a lease holds is held from everyone else for that long, so it is sized
to the key's limits: at most an eighth of its requests or tokens per minute
and of its owner's balance, and a quarter of its concurrent requests. It
admits for ``max_age`` (one second): its requests count in the minute from
the second it was posted. A key whose limits or balance are
too small for a lease of two requests is admitted one request at a time, as
before; so is a key whose last lease was refused, for a second.

Leases are an optional capability of a store (:class:`~core.store.LeaseStore`):
with a store that does not offer them, :class:`~core.services.billing.Billing`
has no :class:`Leases` and admits every request through the store alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from ..errors import InsufficientBalance, LeaseReleased, RateLimitExceeded
from ..records import LedgerDraft, LedgerEntry, RateLimits, RateUse
from ..store import LeaseStore

log = logging.getLogger("chatgate.billing")

MAX_SIZE = 64
"""The most requests one lease stands for."""

MAX_WAITS = 32
"""The most leases one request waits to be posted (others of a burst taking each) before the
store admits it alone."""

RETRY_SECONDS = 1.0
"""How long after a failed write of charges (or a release) it is tried again."""


@dataclass(eq=False)
class Lease:
    """A reservation for several requests of one key, admitted in memory by this process."""

    entry: LedgerEntry
    use: RateUse  # the key's use when the lease was posted, counting all of it
    posted: float  # time.monotonic()
    requests: int  # not yet admitted
    tokens: int  # counted, not yet drawn by an admitted request's prompt estimate
    amount: int  # micro-credits held and not drawn
    in_flight: int = 0
    retired: bool = False
    pending: list[LedgerDraft] = field(default_factory=list)  # charges not yet posted
    pending_tokens: int = 0  # what the pending charges were counted for
    idle_timer: asyncio.TimerHandle | None = None
    shrink: bool = False  # retired with requests running: give back the rest before they end

    def expired(self, now: float, max_age: float) -> bool:
        """Too old to admit more: its requests count in the second it was posted."""
        return now - self.posted > max_age

    def take(self, prompt_tokens: int, worst_case: int, now: float) -> RateUse | None:
        """Admit one request, or None when what is left cannot cover it."""
        if self.requests < 1 or self.tokens < prompt_tokens or self.amount < worst_case:
            return None
        self.requests -= 1
        self.tokens -= prompt_tokens
        self.amount -= worst_case
        self.in_flight += 1
        use = self.use
        elapsed = now - self.posted
        return RateUse(
            requests=use.requests - self.requests,
            tokens=use.tokens - self.tokens,
            concurrent=use.concurrent - self.entry.requests + self.in_flight,
            requests_reset=max(0.0, use.requests_reset - elapsed),
            tokens_reset=max(0.0, use.tokens_reset - elapsed),
        )


class Leases:
    """This process's leases, one admitting at a time per key.

    Promises: a request is admitted only within a lease the store admitted
    (or, when there is none to be had, by the store itself, one by one, with
    the store's own refusals); every admitted request ends in exactly one
    charge entry, or gives its place back to the lease (:meth:`give_back`, never sent);
    a lease is released only after all its charges are posted, and every lease is
    released by :meth:`aclose`.
    """

    def __init__(
        self, store: LeaseStore, *, idle: float = 1.0, max_age: float = 1.0, batch_delay: float = 0.05
    ) -> None:
        self.store = store
        self.batch_delay = batch_delay
        self.idle = idle
        self.max_age = max_age
        self._current: dict[int, Lease] = {}  # key id -> the lease admitting its requests
        self._next: dict[int, Lease] = {}  # key id -> the lease to admit them once that one is used up
        self._posting: dict[int, asyncio.Future[Lease | None]] = {}  # key id -> a lease being posted
        self._alone_until: dict[int, float] = {}  # key id -> admit one by one until then
        self._open: set[Lease] = set()
        self._dirty: set[Lease] = set()  # with charges to post, or retired and idle: to release
        self._flushing: asyncio.Task[None] | None = None
        self._epoch = 0  # moves with retire_all: a lease posted before it admits nothing
        self._charging: set[asyncio.Future[None]] = set()  # charges of released leases, retried

    @staticmethod
    def size(limits: RateLimits, prompt_tokens: int, worst_case: int, balance: int | None) -> int:
        """Requests a lease for this key may stand for (below 2: no lease).

        At most an eighth of the owner's ``balance`` (as last seen): what a lease holds,
        the owner's other requests cannot use.
        """
        size = MAX_SIZE
        if balance is not None and worst_case > 0:
            size = min(size, balance // 8 // worst_case)
        if limits.requests_per_minute is not None:
            size = min(size, limits.requests_per_minute // 8)
        if limits.concurrent_requests is not None:
            size = min(size, limits.concurrent_requests // 4)
        if limits.tokens_per_minute is not None:
            size = min(size, limits.tokens_per_minute // 8 // max(1, 2 * prompt_tokens))
        return size

    async def admit(
        self, draft: LedgerDraft, limits: RateLimits, worst_case: int, balance: int | None = None
    ) -> tuple[Lease, RateUse] | None:
        """Admit the request ``draft`` reserves under a lease of its key; None: admit it alone.

        ``balance`` is the owner's balance as last seen, which bounds the size of a lease.
        """
        assert draft.key_id is not None
        key_id, prompt = draft.key_id, draft.prompt_tokens
        waited = 0  # leases posted while this request waited
        while True:
            now = time.monotonic()
            lease = self._current.get(key_id)
            if lease is not None and lease.expired(now, self.max_age):
                del self._current[key_id]
                self._retire(lease)
                lease = self._next.pop(key_id, None)
                if lease is not None:
                    self._current[key_id] = lease
            if lease is not None:
                use = lease.take(prompt, worst_case, now)
                if use is not None:
                    self._busy(lease)
                    # Half used within the idle time: have the next lease ready before this one
                    # runs out, or every caller's next request would queue behind its posting
                    # and leave together, in step.
                    if lease.requests * 2 < lease.entry.requests and now - lease.posted < self.idle:
                        self._posted(draft, limits, worst_case, balance)
                    return lease, use
                if lease.requests > 0:
                    # A request bigger than what is left (or than a lease just posted for it):
                    # the store admits it alone; the lease stays for the others.
                    return None
                del self._current[key_id]
                self._retire(lease)
                following = self._next.pop(key_id, None)
                if following is not None:
                    self._current[key_id] = following
                    continue
            if waited >= MAX_WAITS or self._alone_until.get(key_id, 0.0) > now:
                return None
            posting = self._posted(draft, limits, worst_case, balance)
            if posting is None:
                return None
            # Shielded: a lease posted for a caller who left is still this key's lease.
            if await asyncio.shield(posting) is None:
                return None  # refused: the store decides request by request for a while
            # A burst larger than a lease waits for the next one rather than going to the store
            # one by one (each its own transaction on a store without group commit).
            waited += 1

    def _posted(
        self, draft: LedgerDraft, limits: RateLimits, worst_case: int, balance: int | None
    ) -> asyncio.Future[Lease | None] | None:
        """The key's next lease being posted (posting it now if it is not); None: no lease fits."""
        assert draft.key_id is not None
        key_id = draft.key_id
        posting = self._posting.get(key_id)
        if posting is None and key_id not in self._next:
            size = self.size(limits, draft.prompt_tokens, worst_case, balance)
            if size < 2:
                return None
            posting = self._posting[key_id] = asyncio.ensure_future(
                self._post(draft, limits, size, worst_case)
            )
        return posting

    async def _post(self, draft: LedgerDraft, limits: RateLimits, size: int, worst_case: int) -> Lease | None:
        assert draft.key_id is not None
        tokens = size * max(1, 2 * draft.prompt_tokens)
        lease_draft = LedgerDraft(
            user_id=draft.user_id,
            amount=-size * worst_case,
            kind="lease",
            key_id=draft.key_id,
            model=draft.model,
            provider=draft.provider,
            prompt_tokens=tokens,
            outcome="open",
            requests=size,
        )
        epoch = self._epoch
        try:
            entry, use = await self.store.admit(lease_draft, limits)
        except (RateLimitExceeded, InsufficientBalance):
            # Too close to a limit or to the floor for a lease: the store decides request by request.
            self._alone_until[draft.key_id] = time.monotonic() + 1.0
            return None
        except Exception:
            # The store admits request by request, and says what is wrong to each of them.
            log.exception("could not post a lease for key %d; admitting one by one", draft.key_id)
            self._alone_until[draft.key_id] = time.monotonic() + 1.0
            return None
        finally:
            # Here, not in a done callback: a caller arriving before that ran would find this
            # finished posting and wait on it again, and again, without ever yielding.
            self._posting.pop(draft.key_id, None)
        lease = Lease(entry, use, time.monotonic(), size, tokens, size * worst_case)
        if epoch != self._epoch:  # retired while it was being posted: released, never used
            self._open.add(lease)
            self._retire(lease)
            return None
        # Released if nobody takes from it (its caller may have left while it was posted).
        lease.idle_timer = asyncio.get_running_loop().call_later(self.idle, self._idle, lease)
        self._open.add(lease)
        if draft.key_id in self._current:  # still admitting: this one follows it
            self._next[draft.key_id] = lease
        else:
            self._current[draft.key_id] = lease
        return lease

    def _busy(self, lease: Lease) -> None:
        if lease.idle_timer is not None:
            lease.idle_timer.cancel()
            lease.idle_timer = None

    def settle(self, lease: Lease, charge: LedgerDraft, counted_tokens: int, worst_case: int) -> None:
        """A request admitted under ``lease`` ended; ``charge`` is what it cost (posted soon)."""
        lease.in_flight -= 1
        lease.amount += worst_case + charge.amount  # the charge's amount is negative
        lease.pending.append(charge)
        lease.pending_tokens += counted_tokens
        self._dirty.add(lease)
        if lease.in_flight == 0 and not lease.retired:
            lease.idle_timer = asyncio.get_running_loop().call_later(self.idle, self._idle, lease)
        self._flush_soon()

    def give_back(self, lease: Lease, prompt_tokens: int, worst_case: int) -> None:
        """A request admitted under ``lease`` never went upstream: its place (one request, its
        prompt's tokens, its worst case) goes back to the lease, to admit another request or to be
        taken out of the key's rate window when the lease is released. No charge is posted for it."""
        lease.in_flight -= 1
        lease.requests += 1
        lease.tokens += prompt_tokens
        lease.amount += worst_case
        self._dirty.add(lease)  # a retired lease is released once nothing runs under it
        if lease.in_flight == 0 and not lease.retired:
            lease.idle_timer = asyncio.get_running_loop().call_later(self.idle, self._idle, lease)
        self._flush_soon()

    def _idle(self, lease: Lease) -> None:
        lease.idle_timer = None
        if lease.in_flight == 0 and not lease.retired:
            key_id = lease.entry.key_id or 0
            for leases in (self._current, self._next):
                if leases.get(key_id) is lease:
                    del leases[key_id]
            self._retire(lease)

    def _retire(self, lease: Lease) -> None:
        if not lease.retired and lease.in_flight:
            lease.shrink = True  # what it still holds, it holds for nobody
        lease.retired = True
        self._busy(lease)
        self._dirty.add(lease)
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flushing is None:
            self._flushing = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        try:
            # Charges that end meanwhile join this write: one store call for many requests.
            await asyncio.sleep(self.batch_delay)
            while self._dirty:
                dirty, self._dirty = self._dirty, set()
                await asyncio.gather(*(self._write(lease) for lease in dirty))
        finally:
            self._flushing = None

    async def _write(self, lease: Lease) -> None:
        if lease.pending:
            charges, counted = lease.pending, lease.pending_tokens
            lease.pending, lease.pending_tokens = [], 0
            try:
                await self.store.charge_lease(lease.entry.id, charges, counted)
            except LeaseReleased:
                # Released by another process, which took it for a dead one's (this process lost
                # its standing meanwhile): the charges go to the balance on their own.
                log.warning(
                    "lease %d was released elsewhere; charging its requests one by one", lease.entry.id
                )
                await self._charge_alone(charges)
            except Exception:
                # Kept and tried again: a lease is released only after its charges.
                log.exception(
                    "could not post %d charge(s) of lease %d; will retry", len(charges), lease.entry.id
                )
                lease.pending[:0], lease.pending_tokens = charges, lease.pending_tokens + counted
                self._retry(lease)
                return
        if lease.shrink and lease.in_flight:
            lease.shrink = False
            unused = (lease.requests, lease.tokens, max(0, lease.amount))
            lease.requests = lease.tokens = lease.amount = 0
            try:
                await self.store.shrink_lease(lease.entry.id, lease.in_flight, *unused)
            except Exception:  # it stays as it was until released: too much held, nothing lost
                log.exception("could not shrink lease %d", lease.entry.id)
                lease.requests, lease.tokens, lease.amount = unused
        if lease.retired and lease.in_flight == 0 and not lease.pending and lease in self._open:
            self._open.discard(lease)
            try:
                await self.store.release_lease(lease.entry.id, lease.requests, lease.tokens)
            except Exception:
                self._open.add(lease)
                log.exception("could not release lease %d; will retry", lease.entry.id)
                self._retry(lease)

    async def _charge_alone(self, charges: list[LedgerDraft]) -> None:
        # No floor, as charge_lease has none: the tokens were spent. What fails is tried again.
        for position, charge in enumerate(charges):
            try:
                await self.store.post_ledger(charge, floor=None)
            except Exception:
                log.exception("could not charge a request of key %s; will retry", charge.key_id)
                rest = charges[position:]

                def again(rest: list[LedgerDraft] = rest) -> None:
                    task = asyncio.ensure_future(self._charge_alone(rest))
                    self._charging.add(task)
                    task.add_done_callback(self._charging.discard)

                asyncio.get_running_loop().call_later(RETRY_SECONDS, again)
                return

    def retire_all(self) -> None:
        """Admit nothing more under the leases held now, or being posted now (this process lost
        its standing: others may release them); requests running under them still post their
        charges."""
        self._epoch += 1
        for lease in list(self._open):
            self._retire(lease)
        self._current.clear()
        self._next.clear()

    def _retry(self, lease: Lease) -> None:
        def again() -> None:
            self._dirty.add(lease)
            self._flush_soon()

        asyncio.get_running_loop().call_later(RETRY_SECONDS, again)

    async def aclose(self) -> None:
        """Post every charge and release every lease (call once no request is running).

        A lease whose write fails stays held until the sweep of stale reservations releases it.
        """
        await asyncio.gather(*self._posting.values(), return_exceptions=True)  # leases still landing
        for lease in list(self._open):
            self._retire(lease)
        self._current.clear()
        self._next.clear()
        while self._flushing is not None:
            await asyncio.shield(self._flushing)
