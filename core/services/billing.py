"""Charging usage to users' balances at the per-model prices of ``plugins.toml``.

A request reserves its worst-case cost before it goes upstream (so
concurrent requests can never overdraw a balance) and settles to the real
usage when it ends, however it ends. Every request leaves exactly one ledger
entry.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from ..config import ModelConfig
from ..store import (
    LedgerDraft,
    LedgerEntry,
    LedgerSettlement,
    Message,
    RateLimits,
    RateUse,
    Store,
    UsageDay,
)
from ..tokens import estimate_prompt_tokens, estimate_tokens
from ..types import ChatRequest, Usage
from .catalog import Route


@dataclass(frozen=True)
class Reservation:
    """A worst-case charge held on a balance until the request settles.

    ``use`` is the key's use of its rate limits, counting this request, when
    it was admitted under limits.
    """

    entry: LedgerEntry
    route: Route
    use: RateUse | None = None


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
    """Prices, reservations and settlements."""

    def __init__(self, store: Store, models: dict[str, ModelConfig]) -> None:
        self.store = store
        self.models = models
        self._giving_back: set[asyncio.Future[LedgerEntry]] = set()

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
        plus the longest allowed reply."""
        prompt = estimate_prompt_tokens(request.messages) if prompt is None else prompt
        reply = min(request.max_tokens or route.config.max_output_tokens, route.config.max_output_tokens)
        return self.cost(route, prompt, reply)

    async def reserve(
        self,
        user_id: int,
        route: Route,
        request: ChatRequest,
        *,
        key_id: int | None,
        limits: RateLimits | None = None,
    ) -> Reservation:
        """Hold the worst-case cost; with ``limits``, only if the key is within them.

        Raises:
            RateLimitExceeded: admitting the request would pass a limit; nothing was written.
            InsufficientBalance: the balance cannot cover it; nothing was written.
        """
        prompt = estimate_prompt_tokens(request.messages)
        draft = LedgerDraft(
            user_id=user_id,
            amount=-self.worst_case(route, request, prompt),
            kind="reservation",
            prompt_tokens=prompt,  # what an orphan is charged for
            key_id=key_id,
            model=route.model,
            provider=route.provider.instance,
            outcome="pending",
        )
        if limits is not None and key_id is not None:
            write: asyncio.Future[tuple[LedgerEntry, RateUse | None]] = asyncio.ensure_future(
                self.store.admit(draft, limits)
            )
        else:
            write = asyncio.ensure_future(self._post(draft))
        try:
            entry, use = await asyncio.shield(write)
        except asyncio.CancelledError:
            # A store may finish the write after its caller is gone; nothing will
            # go upstream, so give the hold back once it lands.
            write.add_done_callback(self._give_back)
            raise
        return Reservation(entry, route, use)

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
    ) -> LedgerEntry:
        """Turn a reservation into the charge for the tokens actually used."""
        settlement = LedgerSettlement(
            amount=-self.cost(reservation.route, usage.prompt_tokens, usage.completion_tokens),
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            latency_ms=latency_ms,
            outcome=outcome,
        )
        return await self.store.settle_ledger(reservation.entry.id, settlement)

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
        settlement = LedgerSettlement(
            amount=-cost, prompt_tokens=entry.prompt_tokens, completion_tokens=produced, outcome="abandoned"
        )
        return await self.store.settle_ledger(entry.id, settlement)

    async def settle_stale(self, entry: LedgerEntry) -> LedgerEntry:
        """Settle a reservation whose process died mid-request: charge its prompt, nothing more.

        What the reply produced died with the process; the prompt was sent, and
        the upstream charged for it.
        """
        model = self.models.get(entry.model or "")
        cost = 0 if model is None else self.cost_at(model, entry.prompt_tokens, 0)
        settlement = LedgerSettlement(amount=-cost, prompt_tokens=entry.prompt_tokens, outcome="abandoned")
        return await self.store.settle_ledger(entry.id, settlement)

    async def release(self, reservation: Reservation) -> LedgerEntry:
        """Give a reservation back untouched: the request never went upstream."""
        settlement = LedgerSettlement(amount=0, outcome="not_sent")
        return await self.store.settle_ledger(reservation.entry.id, settlement)

    async def usage_by_day(
        self, since: datetime, *, user_id: int | None = None, key_id: int | None = None
    ) -> list[UsageDay]:
        """Settled charges per UTC day, user and key, from ``since`` on."""
        return await self.store.usage_by_day(since, user_id=user_id, key_id=key_id)

    async def top_up(self, user_id: int, amount: int, note: str | None = None) -> LedgerEntry:
        """Add credits to a balance (negative ``amount`` takes them away, never below zero)."""
        draft = LedgerDraft(
            user_id=user_id, amount=amount, kind="topup" if amount >= 0 else "adjustment", note=note
        )
        return await self.store.post_ledger(draft, floor=0)
