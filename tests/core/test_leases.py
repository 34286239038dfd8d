"""Leases against a real SQLite store: races and store failures (end to end: test_openai_leases.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core import LedgerDraft, LedgerEntry, RateLimits, User
from core.services.leases import Leases
from stores.sqlite import SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore("sqlite", SqliteStore.Options(path=str(tmp_path / "leases.db")))
    await store.open()
    yield store
    await store.aclose()


async def keyed(store: SqliteStore) -> tuple[User, int]:
    user = await store.ensure_user("lease@example.com")
    key = await store.create_api_key(user.id, "k", "sk-cg-lease", "hash-lease")
    await store.post_ledger(LedgerDraft(user_id=user.id, amount=10**9, kind="topup"))
    return user, key.id


def request(user: User, key_id: int, worst_case: int) -> LedgerDraft:
    return LedgerDraft(
        user_id=user.id, amount=-worst_case, kind="reservation", key_id=key_id, prompt_tokens=5
    )


def charge(user: User, key_id: int, cost: int) -> LedgerDraft:
    return LedgerDraft(user_id=user.id, amount=-cost, kind="charge", key_id=key_id, prompt_tokens=5)


async def ledger(store: SqliteStore, user: User) -> list[LedgerEntry]:
    return await store.list_ledger(user.id)


async def test_callers_arriving_as_a_lease_lands_never_spin(store: SqliteStore) -> None:
    # They find the posting finished but not yet forgotten, and a lease that cannot take them
    # (a larger worst case): they must be admitted alone, not wait on that posting forever.
    user, key_id = await keyed(store)
    leases = Leases(store)
    limits = RateLimits(requests_per_minute=32)  # leases of 4
    admit = store.admit
    late: list[asyncio.Future[Any]] = []

    async def admit_then_arrive(draft: LedgerDraft, limits: RateLimits) -> Any:
        admitted = await admit(draft, limits)
        if not late:
            late.extend(
                asyncio.ensure_future(leases.admit(request(user, key_id, 10**6), limits, 10**6))
                for _ in range(5)
            )
        return admitted

    store.admit = admit_then_arrive  # type: ignore[method-assign,assignment]
    async with asyncio.timeout(5):
        first = await leases.admit(request(user, key_id, 10), limits, 10)
        assert first is not None
        assert await asyncio.gather(*late) == [None] * 5  # each one the store's to admit
    await leases.aclose()


async def test_a_failed_write_of_charges_is_tried_again(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("core.services.leases.RETRY_SECONDS", 0.05)
    user, key_id = await keyed(store)
    leases = Leases(store, idle=0.05, batch_delay=0.0)
    leased = await leases.admit(request(user, key_id, 10), RateLimits(), 10)
    assert leased is not None
    lease, _ = leased
    charge_lease = store.charge_lease
    failures: list[int] = []

    async def fails_once(lease_id: int, charges: list[LedgerDraft], counted: int) -> int:
        if not failures:
            failures.append(lease_id)
            raise OSError("disk I/O error")  # what a full disk looks like
        return await charge_lease(lease_id, charges, counted)

    store.charge_lease = fails_once  # type: ignore[method-assign,assignment]
    leases.settle(lease, charge(user, key_id, 7), counted_tokens=5, worst_case=10)
    async with asyncio.timeout(5):
        while [e.kind for e in await ledger(store, user) if e.kind != "topup"] != ["charge", "released"]:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert failures == [lease.entry.id]
    entries = await ledger(store, user)
    assert sum(e.amount for e in entries) == 10**9 - 7 == (await store.get_user(user.id)).balance
    await leases.aclose()


async def test_a_lease_older_than_its_age_admits_no_more(store: SqliteStore) -> None:
    user, key_id = await keyed(store)
    leases = Leases(store, max_age=0.05)
    first = await leases.admit(request(user, key_id, 10), RateLimits(), 10)
    await asyncio.sleep(0.1)
    second = await leases.admit(request(user, key_id, 10), RateLimits(), 10)
    assert first is not None
    assert second is not None
    assert first[0] is not second[0]
    assert first[0].retired
    await leases.aclose()


async def test_a_lease_holds_at_most_an_eighth_of_the_balance_seen() -> None:
    limits = RateLimits()
    assert Leases.size(limits, 5, worst_case=100, balance=None) == 64
    assert Leases.size(limits, 5, worst_case=100, balance=8 * 100 * 10) == 10
    assert Leases.size(limits, 5, worst_case=100, balance=1000) == 1  # no lease
    assert Leases.size(RateLimits(requests_per_minute=120, concurrent_requests=16), 5, 100, None) == 4


async def test_a_lease_retired_with_requests_running_holds_only_those(store: SqliteStore) -> None:
    user, key_id = await keyed(store)
    leases = Leases(store, max_age=0.05, batch_delay=0.0)
    limits = RateLimits(concurrent_requests=16)  # leases of 4
    running = await leases.admit(request(user, key_id, 10), limits, 10)
    assert running is not None
    await asyncio.sleep(0.1)
    following = await leases.admit(request(user, key_id, 10), limits, 10)  # the first one expired
    assert following is not None
    async with asyncio.timeout(5):
        while (await store.get_ledger_entry(running[0].entry.id)).requests != 1:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    old = await store.get_ledger_entry(running[0].entry.id)
    assert old.amount == -10  # the running request's worst case, no more
    _, use = await store.admit(request(user, key_id, 10), limits)
    assert use.concurrent == 1 + 4 + 1  # the running one, the new lease, this one
    for lease, _ in (running, following):
        leases.settle(lease, charge(user, key_id, 7), counted_tokens=5, worst_case=10)
    await leases.aclose()
    entries = await ledger(store, user)
    assert [e.kind for e in entries].count("lease") == 0
    assert [e.kind for e in entries].count("released") == 2
    assert sum(e.amount for e in entries) == 10**9 - 2 * 7 - 10  # and the reservation


async def test_a_request_given_back_unsent_leaves_the_keys_minute(store: SqliteStore) -> None:
    # One of OpenAI's n choices admitted under a lease, then given back because a sibling was
    # refused: once the lease is released, the key's minute must not count it.
    user, key_id = await keyed(store)
    leases = Leases(store, idle=0.05, batch_delay=0.0)
    leased = await leases.admit(request(user, key_id, 10), RateLimits(requests_per_minute=32), 10)
    assert leased is not None
    lease, _ = leased
    leases.give_back(lease, prompt_tokens=5, worst_case=10)
    async with asyncio.timeout(5):
        while [e.kind for e in await ledger(store, user) if e.kind != "topup"] != ["released"]:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert (await store.get_user(user.id)).balance == 10**9  # nothing charged, no charge entry
    # The window is empty: a limit of one request a minute still admits one.
    entry, _ = await store.admit(request(user, key_id, 10), RateLimits(requests_per_minute=1))
    assert entry.kind == "reservation"
    await leases.aclose()
