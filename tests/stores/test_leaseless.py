"""A store without leases: it passes the conformance suite, and a gateway on it admits request by request.

Leases are an optional capability (:class:`core.store.LeaseStore`). ``LeaselessStore``
writes what :class:`core.store.Store` asks and nothing more, answering from a SQLite
store underneath (its ``admit`` refuses a lease: a store without leases is never asked
for one).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest

from core import (
    ApiKey,
    Conversation,
    ConversationPatch,
    LeaseStore,
    LedgerDraft,
    LedgerEntry,
    LedgerSettlement,
    Message,
    MessageDraft,
    MessagePatch,
    RateLimits,
    RateUse,
    Store,
    StoreError,
    UsageDay,
    User,
    hookimpl,
)
from core.testing.fake_upstream import FakeUpstream, Scenario
from core.testing.store_suite import OpenStore, StoreConformance
from plugins.openai_compat import wire
from stores.sqlite import SqliteOptions, SqliteStore
from tests.conftest import PRICED_MODELS, RunningGateway, deepseek_config, settled

LEASE_METHODS = {"charge_lease", "shrink_lease", "release_lease"}


class LeaselessStore(Store):
    """Every method :class:`Store` asks for, answered by a SQLite store; no leases."""

    name = "leaseless"
    Options = SqliteOptions

    def __init__(self, instance: str, options: SqliteOptions) -> None:
        super().__init__(instance, options)
        self.inner = SqliteStore(instance, options)

    async def open(self) -> None:
        await self.inner.open()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def ping(self) -> None:
        await self.inner.ping()

    async def ensure_user(self, email: str) -> User:
        return await self.inner.ensure_user(email)

    async def get_user(self, user_id: int) -> User:
        return await self.inner.get_user(user_id)

    async def find_user(self, email: str) -> User | None:
        return await self.inner.find_user(email)

    async def list_users(self) -> list[User]:
        return await self.inner.list_users()

    async def create_api_key(self, user_id: int, name: str, prefix: str, key_hash: str) -> ApiKey:
        return await self.inner.create_api_key(user_id, name, prefix, key_hash)

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        return await self.inner.find_api_key(key_hash)

    async def list_api_keys(self, user_id: int | None = None) -> list[ApiKey]:
        return await self.inner.list_api_keys(user_id)

    async def revoke_api_key(self, key_id: int) -> ApiKey:
        return await self.inner.revoke_api_key(key_id)

    async def set_api_key_limits(self, key_id: int, limits: RateLimits) -> ApiKey:
        return await self.inner.set_api_key_limits(key_id, limits)

    async def post_ledger(self, draft: LedgerDraft, *, floor: int | None = 0) -> LedgerEntry:
        return await self.inner.post_ledger(draft, floor=floor)

    async def admit(
        self, draft: LedgerDraft, limits: RateLimits, *, floor: int = 0, tokens_per_day: int | None = None
    ) -> tuple[LedgerEntry, RateUse]:
        if draft.kind == "lease" or draft.requests != 1:
            raise StoreError(f"a store without leases was asked for one: {draft}")
        return await self.inner.admit(draft, limits, floor=floor, tokens_per_day=tokens_per_day)

    async def settle_ledger(self, entry_id: int, settlement: LedgerSettlement) -> LedgerEntry:
        return await self.inner.settle_ledger(entry_id, settlement)

    async def usage_by_day(
        self, since: datetime, *, user_id: int | None = None, key_id: int | None = None
    ) -> list[UsageDay]:
        return await self.inner.usage_by_day(since, user_id=user_id, key_id=key_id)

    async def stale_reservations(self, created_before: datetime) -> list[LedgerEntry]:
        return await self.inner.stale_reservations(created_before)

    async def get_ledger_entry(self, entry_id: int) -> LedgerEntry:
        return await self.inner.get_ledger_entry(entry_id)

    async def list_ledger(self, user_id: int, limit: int = 100) -> list[LedgerEntry]:
        return await self.inner.list_ledger(user_id, limit)

    async def create_conversation(
        self, user_id: int, kind: str, name: str = "", series_id: int | None = None
    ) -> Conversation:
        return await self.inner.create_conversation(user_id, kind, name, series_id)

    async def get_conversation(self, conversation_id: int) -> Conversation:
        return await self.inner.get_conversation(conversation_id)

    async def list_conversations(
        self, user_id: int, kind: str | None = None, series_id: int | None = None
    ) -> list[Conversation]:
        return await self.inner.list_conversations(user_id, kind, series_id)

    async def update_conversation(self, conversation_id: int, patch: ConversationPatch) -> Conversation:
        return await self.inner.update_conversation(conversation_id, patch)

    async def delete_conversation(self, conversation_id: int) -> Conversation:
        return await self.inner.delete_conversation(conversation_id)

    async def append_message(self, conversation_id: int, draft: MessageDraft) -> Message:
        return await self.inner.append_message(conversation_id, draft)

    async def append_messages(self, conversation_id: int, drafts: list[MessageDraft]) -> list[Message]:
        # Optional, but the default is not atomic and the suite checks "all or none".
        return await self.inner.append_messages(conversation_id, drafts)

    async def update_message(self, message_id: int, patch: MessagePatch) -> Message:
        return await self.inner.update_message(message_id, patch)

    async def get_message(self, message_id: int) -> Message:
        return await self.inner.get_message(message_id)

    async def list_messages(self, conversation_id: int) -> list[Message]:
        return await self.inner.list_messages(conversation_id)

    async def interrupt_stale_generations(self, updated_before: datetime) -> list[Message]:
        return await self.inner.interrupt_stale_generations(updated_before)


PLUGIN = SimpleNamespace(__name__="leaseless", register_stores=hookimpl(lambda: [LeaselessStore]))
"""The store as a plugin, for ``create_app(..., extra_plugins=[PLUGIN])``."""


def test_leases_are_not_part_of_what_every_store_writes() -> None:
    assert not LEASE_METHODS & Store.__abstractmethods__
    assert LeaseStore.__abstractmethods__ - Store.__abstractmethods__ == LEASE_METHODS
    assert not issubclass(LeaselessStore, LeaseStore)
    assert issubclass(SqliteStore, LeaseStore)


class TestLeaselessConformance(StoreConformance):
    @pytest.fixture
    def open_store(self, tmp_path: Path) -> OpenStore:
        async def open_store() -> Store:
            store = LeaselessStore("leaseless", SqliteOptions(path=str(tmp_path / "chatgate.db")))
            await store.open()
            return store

        return open_store


MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture
async def gateway(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., object]
) -> RunningGateway:
    config = write_config(
        deepseek_config(fake_deepseek.url) + PRICED_MODELS,
        replace={'plugin = "sqlite"': 'plugin = "leaseless"'},
    )
    return await gateway_factory(config, extra_plugins=[PLUGIN])  # type: ignore[no-any-return,misc]


async def funded_key(gateway: RunningGateway, balance: int, **limits: int) -> tuple[int, str]:
    key, secret = await gateway.services.accounts.create_key("plain@example.com")
    await gateway.services.billing.top_up(key.user_id, balance)
    if limits:
        await gateway.services.billing.store.set_api_key_limits(key.id, RateLimits(**limits))
    return key.user_id, secret


async def completions(gateway: RunningGateway, secret: str, count: int) -> list[int]:
    """``count`` concurrent /v1/chat/completions of one key: their status codes."""
    headers = {"Authorization": f"Bearer {secret}"}
    body = {"model": "deepseek-chat", "messages": MESSAGES}
    responses = await asyncio.gather(
        *(gateway.client.post("/v1/chat/completions", json=body, headers=headers) for _ in range(count))
    )
    return [response.status_code for response in responses]


async def test_a_busy_key_is_admitted_request_by_request_and_charged_exactly_once(
    gateway: RunningGateway, fake_deepseek: FakeUpstream
) -> None:
    billing = gateway.services.billing
    assert isinstance(billing.store, LeaselessStore)
    assert billing.leases is None
    # Limits and balance that give a lease of 64 on a store that offers them.
    user_id, secret = await funded_key(gateway, 10**12, requests_per_minute=1000, concurrent_requests=400)
    fake_deepseek.scenario = Scenario(tokens=8, token_delay=0.01)
    async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=secret, max_retries=0) as sdk:
        answers = await asyncio.gather(
            *(sdk.chat.completions.create(model="deepseek-chat", messages=MESSAGES) for _ in range(20))  # type: ignore[arg-type]
        )
        raw = await sdk.chat.completions.with_raw_response.create(model="deepseek-chat", messages=MESSAGES)  # type: ignore[arg-type]
    # Every request was admitted by the store and counted in the key's minute.
    assert raw.headers["x-ratelimit-remaining-requests"] == str(1000 - 21)
    entries = await settled(gateway, user_id)
    assert sorted({e.kind for e in entries}) == ["charge", "topup"]  # no lease, nothing left open
    charges = [e for e in entries if e.kind == "charge"]
    assert len(charges) == len(fake_deepseek.requests) == 21
    usages = [answer.usage for answer in [*answers, raw.parse()]]
    costs = [-(u.prompt_tokens * 1000 + u.completion_tokens * 2000) for u in usages if u is not None]
    assert len(costs) == 21
    assert sorted(c.amount for c in charges) == sorted(costs)  # each request charged once, for its usage
    assert all(c.outcome == "complete" and c.key_id is not None and c.requests == 1 for c in charges)
    user = await billing.store.get_user(user_id)
    assert user.balance == 10**12 + sum(c.amount for c in charges) == sum(e.amount for e in entries)


async def test_a_keys_requests_per_minute_hold_under_a_burst(
    gateway: RunningGateway, fake_deepseek: FakeUpstream
) -> None:
    user_id, secret = await funded_key(gateway, 10**12, requests_per_minute=5)
    statuses = await completions(gateway, secret, 12)
    assert sorted(statuses) == [200] * 5 + [429] * 7
    assert len(fake_deepseek.requests) == 5  # the refused ones never went upstream
    entries = await settled(gateway, user_id)
    assert sorted(e.kind for e in entries) == ["charge"] * 5 + ["topup"]  # and left nothing behind


async def held_and_refused(
    gateway: RunningGateway, fake: FakeUpstream, secret: str, count: int, held: int
) -> list[int]:
    """``count`` concurrent completions against an upstream that stalls every reply: the statuses
    of the ``count - held`` that were answered (refused) while ``held`` stayed admitted, in
    flight upstream. The held ones are then abandoned (their clients go), which settles them."""
    fake.scenario = Scenario(stall_after=0)  # admitted replies stay in flight until their client goes
    headers = {"Authorization": f"Bearer {secret}"}
    body = {"model": "deepseek-chat", "messages": MESSAGES}
    tasks = [
        asyncio.ensure_future(gateway.client.post("/v1/chat/completions", json=body, headers=headers))
        for _ in range(count)
    ]
    try:
        async with asyncio.timeout(30):  # a bound for a broken admission, not a timing expectation
            while sum(task.done() for task in tasks) < count - held or len(fake.requests) < held:
                await asyncio.wait([t for t in tasks if not t.done()], timeout=0.05)
        assert len(fake.requests) == held
        return [task.result().status_code for task in tasks if task.done()]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        fake.scenario = Scenario()


async def test_a_keys_concurrent_requests_hold(gateway: RunningGateway, fake_deepseek: FakeUpstream) -> None:
    user_id, secret = await funded_key(gateway, 10**12, concurrent_requests=2)
    statuses = await held_and_refused(gateway, fake_deepseek, secret, 6, held=2)
    assert statuses == [429] * 4
    await settled(gateway, user_id)  # the two held replies, abandoned, are settled
    assert await completions(gateway, secret, 1) == [200]  # and their slots were given back


async def test_the_balance_floor_holds_across_concurrent_requests(
    gateway: RunningGateway, fake_deepseek: FakeUpstream
) -> None:
    billing = gateway.services.billing
    route = gateway.services.catalog.route("deepseek-chat")
    request = wire.parse(json.dumps({"model": "deepseek-chat", "messages": MESSAGES}).encode()).request
    worst = billing.worst_case(route, request)
    user_id, secret = await funded_key(gateway, 3 * worst + worst // 2)  # three worst cases, not four
    statuses = await held_and_refused(gateway, fake_deepseek, secret, 8, held=3)
    assert statuses == [403] * 5
    entries = await settled(gateway, user_id)
    user = await billing.store.get_user(user_id)
    assert 0 <= user.balance == sum(e.amount for e in entries)
    assert sum(e.kind == "charge" for e in entries) == 3 == len(fake_deepseek.requests)
