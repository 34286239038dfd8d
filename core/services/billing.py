"""Charging usage to users' balances at the per-model prices of ``plugins.toml``.

A request reserves its worst-case cost before it goes upstream (so
concurrent requests can never overdraw a balance) and settles to the real
usage when it ends, however it ends. Every request leaves exactly one ledger
entry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import msgspec

from ..config import ModelConfig
from ..errors import ContextTooLong, OutOfStanding
from ..records import (
    LedgerDraft,
    LedgerEntry,
    LedgerKind,
    LedgerSettlement,
    Message,
    RateLimits,
    RateUse,
    UsageDay,
)
from ..store import LeaseStore, Store
from ..tokens import estimate_request_tokens, estimate_tokens
from ..types import ChatRequest, Usage
from .catalog import Route
from .leases import Lease, Leases

log = logging.getLogger("chatgate.billing")


@dataclass(frozen=True)
class Reservation:
    """A worst-case charge held on a balance until the request settles.

    ``use`` is the key's use of its rate limits, counting this request, when
    it was admitted under limits.
    """

    entry: LedgerEntry
    route: Route
    use: RateUse | None = None
    prompt_tokens: int = 0  # the estimate the request was admitted with
    worst_case: int = 0
    lease: Lease | None = None  # admitted under this lease (``entry`` is the lease's)


@dataclass(frozen=True)
class Quota:
    """Per-user limits of usage that no key pays for (the email surface's); None: no limit."""

    requests_per_minute: int | None = None
    tokens_per_day: int | None = None


@dataclass(frozen=True)
class Payer:
    """Who pays for a request, and what admits it.

    By default the owner's balance, at the model's prices, with no limit. With
    ``key_id``, the key's request, within ``limits`` when given (``balance``, the
    owner's as last seen, sizes a lease). With ``quota``, nobody pays: the usage
    is recorded under the owner at its tokens with amount 0, within the quota.
    """

    key_id: int | None = None
    limits: RateLimits | None = None
    balance: int | None = None
    quota: Quota | None = None


def unpriced(route: Route) -> Route:
    """``route`` with its model's prices at zero: what usage nobody pays for costs."""
    config = msgspec.structs.replace(route.config, input_price=0.0, output_price=0.0)
    return dataclasses.replace(route, config=config)


@functools.lru_cache(maxsize=256)
def _exact(price: float) -> tuple[int, int]:
    """A configured price as written (0.1, not 0.1000000000000000055...), as the integer
    fraction ``numerator / 10**k``: a handful of distinct prices, converted once, so a
    request's cost is integer arithmetic."""
    exact = Decimal(str(price))
    exponent = exact.as_tuple().exponent
    scale = 10 ** max(0, -exponent) if isinstance(exponent, int) else 1
    return int(exact * scale), scale


class Billing:
    """Prices, reservations and settlements.

    A key's requests are admitted under leases (``leases``) when the store offers
    them (:class:`~core.store.LeaseStore`); otherwise ``leases`` is None and each
    request is admitted by the store alone, within the same limits and floor.
    """

    def __init__(self, store: Store, models: dict[str, ModelConfig]) -> None:
        self.store = store
        self.models = models
        self._giving_back: set[asyncio.Future[LedgerEntry]] = set()
        self.leases = Leases(store) if isinstance(store, LeaseStore) else None
        self.standing: Callable[[], str | None] | None = None
        """Set once this process joined a cluster store: why it may not admit now, or None."""

    async def aclose(self) -> None:
        """Post the charges of requests admitted under leases and release the leases."""
        if self.leases is not None:
            await self.leases.aclose()

    @staticmethod
    def cost(route: Route, prompt_tokens: int, completion_tokens: int) -> int:
        """Micro-credits for this many tokens at the route's model prices."""
        return Billing.cost_at(route.config, prompt_tokens, completion_tokens)

    @staticmethod
    def cost_at(model: ModelConfig, prompt_tokens: int, completion_tokens: int) -> int:
        """Micro-credits for this many tokens; prices are credits per million tokens, rounded up."""
        into, into_scale = _exact(model.input_price)
        out, out_scale = _exact(model.output_price)
        micro = into * prompt_tokens * out_scale + out * completion_tokens * into_scale
        return -(-micro // (into_scale * out_scale))  # rounded up

    def worst_case(self, route: Route, request: ChatRequest, prompt: int | None = None) -> int:
        """The most ``request`` can cost: its estimated prompt (``prompt`` tokens, when known)
        plus the longest allowed reply (``route.output_tokens``, what it asks upstream for)."""
        prompt = estimate_request_tokens(request) if prompt is None else prompt
        return self.cost(route, prompt, route.output_tokens(request))

    @staticmethod
    def prompt_tokens(route: Route, request: ChatRequest) -> int:
        """The estimated prompt tokens of the whole of ``request`` (see :func:`estimate_request_tokens`).

        Raises:
            ContextTooLong: the prompt and one output token do not fit the model's ``context_tokens``.
        """
        prompt = estimate_request_tokens(request)
        if prompt >= route.config.context_tokens:
            raise ContextTooLong(prompt, route.config.context_tokens - 1)
        return prompt

    async def reserve(
        self,
        user_id: int,
        route: Route,
        request: ChatRequest,
        *,
        key_id: int | None,
        limits: RateLimits | None = None,
        balance: int | None = None,
        quota: Quota | None = None,
    ) -> Reservation:
        """Hold the worst-case cost; with ``limits``, only if the key is within them.

        With ``limits``, the request may be admitted under a lease of its key (when the
        store offers leases), sized to at most an eighth of ``balance`` (the owner's, as
        last seen) when it is given.

        With ``quota`` (and no key), nobody pays: the reservation holds nothing and settles
        at amount 0 with the real tokens, and it is admitted only within the quota of the
        user's usage without a key.

        Raises:
            RateLimitExceeded: admitting the request would pass a limit; nothing was written.
            InsufficientBalance: the balance cannot cover it; nothing was written.
            ContextTooLong: the request cannot fit the model's context; nothing was written.
        """
        if self.standing is not None and (why := self.standing()) is not None:
            # Fail closed: others may be taking over what this process holds (core.cluster).
            raise OutOfStanding(f"this gateway instance admits nothing just now: {why}; retry shortly")
        if quota is not None:
            return await self._reserve_unpriced(user_id, route, request, quota)
        prompt = self.prompt_tokens(route, request)
        worst_case = self.worst_case(route, request, prompt)
        return await self._admit(user_id, route, prompt, worst_case, key_id, limits, balance)

    async def reserve_input(
        self,
        user_id: int,
        route: Route,
        prompt_tokens: int,
        *,
        key_id: int | None,
        limits: RateLimits | None = None,
        balance: int | None = None,
    ) -> Reservation:
        """Hold the cost of ``prompt_tokens`` input tokens and no output (an embeddings
        request), admitted as :meth:`reserve` admits a reply: within ``limits``, under a lease
        when the store offers them, never overdrawing the balance.

        Raises:
            RateLimitExceeded: admitting the request would pass a limit; nothing was written.
            InsufficientBalance: the balance cannot cover it; nothing was written.
        """
        if self.standing is not None and (why := self.standing()) is not None:
            raise OutOfStanding(f"this gateway instance admits nothing just now: {why}; retry shortly")
        worst_case = self.cost(route, prompt_tokens, 0)
        return await self._admit(user_id, route, prompt_tokens, worst_case, key_id, limits, balance)

    async def _admit(
        self,
        user_id: int,
        route: Route,
        prompt: int,
        worst_case: int,
        key_id: int | None,
        limits: RateLimits | None,
        balance: int | None,
    ) -> Reservation:
        draft = LedgerDraft(
            user_id=user_id,
            amount=-worst_case,
            kind="reservation",
            prompt_tokens=prompt,  # what an orphan is charged for
            key_id=key_id,
            model=route.model,
            provider=route.provider.instance,
            outcome="pending",
        )
        if limits is not None and key_id is not None:
            if self.leases is not None:
                leased = await self.leases.admit(draft, limits, worst_case, balance)
                if leased is not None:
                    lease, leased_use = leased
                    return Reservation(lease.entry, route, leased_use, prompt, worst_case, lease)
            write: asyncio.Future[tuple[LedgerEntry, RateUse | None]] = asyncio.ensure_future(
                self.store.admit(draft, limits)
            )
        else:
            write = asyncio.ensure_future(self._post(draft))
        entry, use = await self._landed(write)
        return Reservation(entry, route, use, prompt, worst_case)

    async def _landed(
        self, write: asyncio.Future[tuple[LedgerEntry, RateUse | None]]
    ) -> tuple[LedgerEntry, RateUse | None]:
        """The reservation ``write`` posts. A store may finish the write after its caller is
        gone; nothing will go upstream then, so the hold is given back once it lands."""
        try:
            return await asyncio.shield(write)
        except asyncio.CancelledError:
            write.add_done_callback(self._give_back)
            raise

    async def _reserve_unpriced(
        self, user_id: int, route: Route, request: ChatRequest, quota: Quota
    ) -> Reservation:
        prompt = self.prompt_tokens(route, request)
        draft = LedgerDraft(
            user_id=user_id,
            amount=0,
            kind="reservation",
            prompt_tokens=prompt,
            model=route.model,
            provider=route.provider.instance,
            outcome="pending",
        )
        limits = RateLimits(requests_per_minute=quota.requests_per_minute)
        write: asyncio.Future[tuple[LedgerEntry, RateUse | None]] = asyncio.ensure_future(
            self.store.admit(draft, limits, tokens_per_day=quota.tokens_per_day)
        )
        entry, use = await self._landed(write)
        # Settled at zero prices, whatever the model costs a key holder.
        return Reservation(entry, unpriced(route), use, prompt, 0)

    async def _post(self, draft: LedgerDraft) -> tuple[LedgerEntry, None]:
        return await self.store.post_ledger(draft, floor=0), None

    def _give_back(self, write: asyncio.Future[tuple[LedgerEntry, RateUse | None]]) -> None:
        if write.cancelled() or write.exception() is not None:
            return
        entry, _ = write.result()
        task = asyncio.ensure_future(
            self.store.settle_ledger(entry.id, LedgerSettlement(amount=0, outcome="not_sent"))
        )
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    async def settle(
        self, reservation: Reservation, usage: Usage, *, outcome: str, latency_ms: int
    ) -> LedgerEntry | None:
        """Turn a reservation into the charge for the tokens actually used, at most the reservation.

        An upstream that produced more than it was asked for (or counted a prompt above
        its estimate) is not the caller's to pay for: the charge stops at the worst case
        reserved, so no settlement takes a balance below the floor its reservation kept.

        Returns the charge, or None for a request admitted under a lease: its
        charge is posted with others shortly after.
        """
        cost = self.cost(reservation.route, usage.prompt_tokens, usage.completion_tokens)
        if cost > reservation.worst_case:
            log.warning(
                "provider %r reported %d prompt and %d completion tokens for %r, more than was reserved;"
                " charged the reservation",
                reservation.route.provider.instance,
                usage.prompt_tokens,
                usage.completion_tokens,
                reservation.route.model,
            )
            cost = reservation.worst_case
        if reservation.lease is not None:
            self._charge_lease(reservation, cost, usage, outcome, latency_ms)
            return None
        settlement = LedgerSettlement(
            amount=-cost,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            latency_ms=latency_ms,
            outcome=outcome,
        )
        return await self.store.settle_ledger(reservation.entry.id, settlement)

    def _charge_lease(
        self, reservation: Reservation, cost: int, usage: Usage, outcome: str, latency_ms: int | None
    ) -> None:
        # Only a reservation admitted under a lease comes here, and only Leases make those.
        assert reservation.lease is not None
        assert self.leases is not None
        lease = reservation.lease.entry
        route = reservation.route  # a key's lease serves all its models
        charge = LedgerDraft(
            user_id=lease.user_id,
            amount=-cost,
            kind="charge",
            key_id=lease.key_id,
            model=route.model,
            provider=route.provider.instance,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            latency_ms=latency_ms,
            outcome=outcome,
        )
        self.leases.settle(reservation.lease, charge, reservation.prompt_tokens, reservation.worst_case)

    async def settle_abandoned(self, reply: Message) -> LedgerEntry | None:
        """Settle the reservation of a reply whose process died, for what the reply shows it produced.

        Returns None when the reply held no reservation or it was settled already.
        """
        if reply.ledger_id is None:
            return None
        entry = await self.store.get_ledger_entry(reply.ledger_id)
        if entry.kind != "reservation":
            return None
        produced = estimate_tokens(reply.content) + estimate_tokens(reply.reasoning)
        model = self.models.get(entry.model or "")
        cost = 0 if model is None else self.cost_at(model, entry.prompt_tokens, produced)
        # Never more than was reserved: one that held nothing (an email's) stays free.
        cost = min(cost, -entry.amount)
        settlement = LedgerSettlement(
            amount=-cost, prompt_tokens=entry.prompt_tokens, completion_tokens=produced, outcome="abandoned"
        )
        return await self.store.settle_ledger(entry.id, settlement)

    async def settle_stale(self, entry: LedgerEntry) -> LedgerEntry:
        """Settle a reservation whose process died mid-request: charge its prompt, nothing more.

        What the reply produced died with the process; the prompt was sent, and
        the upstream charged for it. A lease is released: the charges of its
        requests that ended before the process died were posted; the rest died
        with it.
        """
        if entry.kind == "lease" and isinstance(self.store, LeaseStore):
            # Its requests' charges that were posted are all it cost.
            return await self.store.release_lease(entry.id, 0, 0)
        model = self.models.get(entry.model or "")
        cost = 0 if model is None else self.cost_at(model, entry.prompt_tokens, 0)
        cost = min(cost, -entry.amount)  # never more than was reserved (an email's held nothing)
        settlement = LedgerSettlement(amount=-cost, prompt_tokens=entry.prompt_tokens, outcome="abandoned")
        return await self.store.settle_ledger(entry.id, settlement)

    async def release(self, reservation: Reservation, *, uncount: bool = False) -> LedgerEntry | None:
        """Give a reservation back untouched: the request never went upstream.

        With ``uncount``, the request stops counting against the key's rate limits too (its
        entry becomes ``released``, which the rate window does not count; under a lease, its
        place goes back to the lease): for a request refused before it was sent because
        another reservation of the same call was (OpenAI's ``n``), which must not use up the
        key's minute.
        """
        if reservation.lease is not None:
            if uncount:
                assert self.leases is not None
                self.leases.give_back(reservation.lease, reservation.prompt_tokens, reservation.worst_case)
                return None
            self._charge_lease(reservation, 0, Usage(), "not_sent", None)
            return None
        kind: LedgerKind = "released" if uncount else "charge"
        settlement = LedgerSettlement(amount=0, kind=kind, outcome="not_sent")
        return await self.store.settle_ledger(reservation.entry.id, settlement)

    async def usage_by_day(
        self, since: datetime, *, user_id: int | None = None, key_id: int | None = None
    ) -> list[UsageDay]:
        """Settled charges per UTC day, user and key, from ``since`` on."""
        return await self.store.usage_by_day(since, user_id=user_id, key_id=key_id)

    async def top_up(self, user_id: int, amount: int, note: str | None = None) -> LedgerEntry:
        """Add credits to a balance (negative ``amount`` takes them away, never below zero).

        Raises:
            BalanceTooLarge: the balance would pass :data:`core.money.MAX_BALANCE`; nothing changed.
            InsufficientBalance: taking ``-amount`` away would leave it below zero; nothing changed.
        """
        draft = LedgerDraft(
            user_id=user_id, amount=amount, kind="topup" if amount >= 0 else "adjustment", note=note
        )
        return await self.store.post_ledger(draft, floor=0)
