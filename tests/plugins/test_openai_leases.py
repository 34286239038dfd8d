"""Leases: a busy key's requests admitted without a store call each, billed and limited exactly."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from core import LedgerEntry, RateLimits
from core.testing.fake_upstream import FakeUpstream, Scenario
from plugins.openai_compat import wire
from tests.conftest import PRICED_MODELS, RunningGateway, deepseek_config
from tests.plugins.test_openai_limits import through_two_workers

MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture
async def gateway(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., object]
) -> RunningGateway:
    return await gateway_factory(write_config(deepseek_config(fake_deepseek.url) + PRICED_MODELS))  # type: ignore[no-any-return,misc]


async def complete(gateway: RunningGateway, secret: str, *models: str) -> None:
    """One whole completion per model, one after the other, through the openai SDK."""
    async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=secret, max_retries=0) as sdk:
        for model in models:
            await sdk.chat.completions.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]


async def funded_key(gateway: RunningGateway, balance: int, **limits: int) -> tuple[int, str]:
    key, secret = await gateway.services.accounts.create_key("busy@example.com")
    await gateway.services.billing.top_up(key.user_id, balance)
    if limits:
        await gateway.services.billing.store.set_api_key_limits(key.id, RateLimits(**limits))
    return key.user_id, secret


async def ledger_until(
    gateway: RunningGateway, user_id: int, done: Callable[[list[LedgerEntry]], bool]
) -> list[LedgerEntry]:
    async with asyncio.timeout(5):
        while not done(entries := await gateway.services.billing.store.list_ledger(user_id)):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return entries


async def test_a_busy_key_runs_on_one_lease_and_every_request_is_charged_exactly(
    gateway: RunningGateway, fake_deepseek: FakeUpstream
) -> None:
    assert gateway.services.billing.leases is not None  # the SQLite store offers leases
    gateway.services.billing.leases.idle = 0.2
    user_id, secret = await funded_key(gateway, 10**12, requests_per_minute=1000, concurrent_requests=400)
    fake_deepseek.scenario = Scenario(tokens=8, token_delay=0.01)
    async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=secret, max_retries=0) as sdk:
        answers = await asyncio.gather(
            *(sdk.chat.completions.create(model="deepseek-chat", messages=MESSAGES) for _ in range(30))  # type: ignore[arg-type]
        )
        # One at a time, the rate headers still count every request.
        remaining = []
        for _ in range(3):
            raw = await sdk.chat.completions.with_raw_response.create(
                model="deepseek-chat",
                messages=MESSAGES,  # type: ignore[arg-type]
            )
            remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [969, 968, 967]
    entries = await ledger_until(gateway, user_id, lambda es: not any(e.kind == "lease" for e in es))
    leases = [e for e in entries if e.kind == "released"]
    charges = [e for e in entries if e.kind == "charge"]
    # One lease for all of them (and perhaps the next, posted before the first ran out).
    assert 1 <= len(leases) <= 2, [(e.kind, e.requests) for e in entries]
    assert all((lease.requests, lease.amount) == (64, 0) for lease in leases)
    assert len(charges) == len(fake_deepseek.requests) == 33
    assert not any(e.kind == "reservation" for e in entries)
    for answer, charge in zip(answers, sorted(charges, key=lambda e: e.id)[:30], strict=True):
        assert answer.usage is not None
        assert charge.amount == -(answer.usage.prompt_tokens * 1000 + answer.usage.completion_tokens * 2000)
        assert (charge.outcome, charge.model, charge.provider) == ("complete", "deepseek-chat", "deepseek")
        assert charge.latency_ms is not None
        assert charge.key_id is not None
    user = await gateway.services.billing.store.get_user(user_id)
    assert user.balance == 10**12 + sum(c.amount for c in charges)
    assert sum(e.amount for e in entries) == user.balance  # nothing held once the lease is released
    usage = await gateway.services.billing.usage_by_day(leases[0].created_at)
    assert [row.requests for row in usage] == [33]
    # The minute counts the 33 requests served, not the 64 the lease stood for: the next
    # lease's first request is the 34th.
    async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=secret, max_retries=0) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(model="deepseek-chat", messages=MESSAGES)  # type: ignore[arg-type]
    assert raw.headers["x-ratelimit-remaining-requests"] == "966"


async def test_a_client_that_leaves_mid_stream_under_a_lease_pays_for_what_it_got(
    gateway: RunningGateway, fake_deepseek: FakeUpstream
) -> None:
    user_id, secret = await funded_key(gateway, 10**12)
    fake_deepseek.scenario = Scenario(tokens=200, token_delay=0.05)
    body = {"model": "deepseek-chat", "messages": MESSAGES, "stream": True}
    headers = {"Authorization": f"Bearer {secret}"}
    async with (
        httpx.AsyncClient(base_url=gateway.url) as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response,
    ):
        received = 0
        async for line in response.aiter_lines():
            received += '"content":"' in line and '"content":""' not in line
            if received == 3:
                break
    entries = await ledger_until(gateway, user_id, lambda es: any(e.kind == "charge" for e in es))
    (charge,) = [e for e in entries if e.kind == "charge"]
    assert charge.outcome == "cancelled"
    assert 3 <= charge.completion_tokens < 200
    assert [e.kind for e in entries if e.kind in ("lease", "reservation")] == ["lease"]


async def test_shutdown_posts_every_charge_and_releases_every_lease(
    gateway: RunningGateway, fake_deepseek: FakeUpstream
) -> None:
    user_id, secret = await funded_key(gateway, 10**12)
    await complete(gateway, secret, *["deepseek-chat"] * 3)
    await gateway.services.completions.aclose()
    await gateway.services.billing.aclose()  # what the server's shutdown does, in this order
    entries = await gateway.services.billing.store.list_ledger(user_id)
    kinds = [e.kind for e in entries]
    assert (kinds.count("charge"), kinds.count("topup"), kinds.count("lease")) == (3, 1, 0)
    assert kinds.count("released") >= 1  # the one in use, and the next when it was posted in time
    user = await gateway.services.billing.store.get_user(user_id)
    assert sum(e.amount for e in entries) == user.balance < 10**12


async def test_a_lease_a_dead_process_left_is_given_back_by_the_sweep(
    gateway: RunningGateway, fake_deepseek: FakeUpstream
) -> None:
    user_id, secret = await funded_key(gateway, 10**12)
    await complete(gateway, secret, "deepseek-chat")
    entries = await ledger_until(gateway, user_id, lambda es: any(e.kind == "charge" for e in es))
    (lease,) = [e for e in entries if e.kind == "lease"]
    # As if this process had died: the lease stays open, and another process's sweep finds it.
    released = await gateway.services.billing.settle_stale(
        await gateway.services.billing.store.get_ledger_entry(lease.id)
    )
    assert (released.kind, released.amount) == ("released", 0)
    entries = await gateway.services.billing.store.list_ledger(user_id)
    (charge,) = [e for e in entries if e.kind == "charge"]
    user = await gateway.services.billing.store.get_user(user_id)
    assert user.balance == 10**12 + charge.amount == sum(e.amount for e in entries)


async def test_a_balance_too_small_for_a_lease_is_admitted_request_by_request(
    gateway: RunningGateway, fake_deepseek: FakeUpstream
) -> None:
    user_id, secret = await funded_key(gateway, 20_000_000)  # two or three worst cases, not 64
    await complete(gateway, secret, "deepseek-chat")
    entries = await ledger_until(gateway, user_id, lambda es: any(e.kind == "charge" for e in es))
    assert sorted(e.kind for e in entries) == ["charge", "topup"]  # a settled reservation; no lease


def test_two_workers_with_leases_share_one_limit(write_config: Callable[..., Path], server_process) -> None:  # type: ignore[no-untyped-def]
    # 40 a minute: leases of 5 requests. If each worker kept its own count, 80 would pass.
    responses = through_two_workers(write_config, server_process, 40, 60)
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}, statuses
    assert 30 <= statuses.count(200) <= 40, statuses
    assert all(int(r.headers["Retry-After"]) >= 1 for r in responses if r.status_code == 429)


async def test_a_lease_nobody_takes_from_is_released_when_idle(
    gateway: RunningGateway, fake_deepseek: FakeUpstream
) -> None:
    billing = gateway.services.billing
    assert billing.leases is not None
    billing.leases.idle = 0.1
    user_id, _ = await funded_key(gateway, 10**12)
    key = (await billing.store.list_api_keys(user_id))[0]
    route = gateway.services.catalog.route("deepseek-chat")
    request = wire.parse(json.dumps({"model": "deepseek-chat", "messages": MESSAGES}).encode()).request
    # A caller who leaves while its lease is being posted: the lease lands, and nobody takes from it.
    admitting = asyncio.ensure_future(
        billing.reserve(user_id, route, request, key_id=key.id, limits=RateLimits())
    )
    await asyncio.sleep(0)
    admitting.cancel()
    entries = await ledger_until(gateway, user_id, lambda es: any(e.kind == "released" for e in es))
    assert sorted(e.kind for e in entries) == ["released", "topup"]
    assert (await billing.store.get_user(user_id)).balance == 10**12 == sum(e.amount for e in entries)


async def test_the_next_lease_is_posted_before_the_first_runs_out(
    gateway: RunningGateway, fake_deepseek: FakeUpstream
) -> None:
    user_id, secret = await funded_key(gateway, 10**12, requests_per_minute=1000, concurrent_requests=400)
    body = {"model": "deepseek-chat", "messages": MESSAGES}
    headers = {"Authorization": f"Bearer {secret}"}
    for _ in range(40):  # past half of a lease of 64, within a second
        response = await gateway.client.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 200
    entries = await ledger_until(gateway, user_id, lambda es: sum(e.kind == "charge" for e in es) == 40)
    assert [(e.kind, e.requests) for e in entries if e.kind == "lease"] == [("lease", 64), ("lease", 64)]


async def test_each_charge_names_its_own_model_under_a_shared_lease(
    gateway: RunningGateway, fake_deepseek: FakeUpstream
) -> None:
    user_id, secret = await funded_key(gateway, 10**12)
    await complete(gateway, secret, "deepseek-chat", "deepseek-reasoner", "deepseek-chat")
    entries = await ledger_until(gateway, user_id, lambda es: sum(e.kind == "charge" for e in es) == 3)
    assert "lease" in [e.kind for e in entries]
    charges = sorted((e for e in entries if e.kind == "charge"), key=lambda e: e.id)
    assert [c.model for c in charges] == ["deepseek-chat", "deepseek-reasoner", "deepseek-chat"]
