"""Per-key rate limits on /v1/chat/completions: counted in the store, so every worker shares them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from core import RateLimits
from core.testing.fake_upstream import FakeUpstream, Scenario
from plugins.openai_compat import Options
from plugins.openai_compat.answers import duration
from tests.conftest import RunningGateway, chatgate, deepseek_config

MODELS = """
[models.deepseek-chat]
provider = "deepseek"
"""
BODY = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Hi"}]}


class Keyed:
    def __init__(self, gateway: RunningGateway, key_id: int, secret: str) -> None:
        self.gateway = gateway
        self.key_id = key_id
        self.secret = secret

    async def limit(self, **limits: int | None) -> None:
        await self.gateway.services.billing.store.set_api_key_limits(self.key_id, RateLimits(**limits))

    async def post(self, body: dict[str, object] = BODY):  # type: ignore[no-untyped-def]
        return await self.gateway.client.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {self.secret}"}
        )


@pytest.fixture
async def keyed(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., object]
) -> Keyed:
    config = write_config(
        deepseek_config(fake_deepseek.url) + MODELS,
        replace={"[surfaces.openai_compat]\n": "[surfaces.openai_compat]\nrequests_per_minute = 5\n"},
    )
    gateway: RunningGateway = await gateway_factory(config)  # type: ignore[assignment,misc]
    key, secret = await gateway.services.accounts.create_key("limited@example.com")
    return Keyed(gateway, key.id, secret)


async def test_the_configured_default_applies_and_the_headers_count_down(keyed: Keyed) -> None:
    remaining = []
    for _ in range(5):
        response = await keyed.post()
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-requests"] == "5"
        remaining.append(response.headers["x-ratelimit-remaining-requests"])
        assert response.headers["x-ratelimit-reset-requests"].endswith("s")
        assert "x-ratelimit-limit-tokens" in response.headers
    assert remaining == ["4", "3", "2", "1", "0"]
    refused = await keyed.post()
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "requests"
    assert "requests per minute" in error["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert 0 < int(refused.headers["retry-after-ms"]) <= 60_000
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


async def test_a_key_override_replaces_the_default(keyed: Keyed, fake_deepseek: FakeUpstream) -> None:
    await keyed.limit(requests_per_minute=1)
    assert (await keyed.post()).status_code == 200
    refused = await keyed.post()
    assert refused.status_code == 429
    assert len(fake_deepseek.requests) == 1  # the refused request never went upstream
    entries = await keyed.gateway.services.billing.store.list_ledger(
        (await keyed.gateway.services.accounts.find_user("limited@example.com")).id  # type: ignore[union-attr]
    )
    assert len(entries) == 1  # and left no ledger entry


async def test_tokens_per_minute(keyed: Keyed) -> None:
    await keyed.limit(tokens_per_minute=30)
    big = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "word " * 200}]}
    refused = await keyed.post(big)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "tokens"


async def test_the_sdk_retries_a_concurrency_refusal_and_then_succeeds(
    keyed: Keyed, fake_deepseek: FakeUpstream
) -> None:
    await keyed.limit(concurrent_requests=1)
    fake_deepseek.script(Scenario(tokens=12, token_delay=0.05))  # the first request holds the slot ~0.6 s
    body = {**BODY, "stream": True}
    holder = asyncio.create_task(keyed.post(body))
    async with asyncio.timeout(5):
        while not fake_deepseek.requests:  # noqa: ASYNC110 - the fake exposes a list
            await asyncio.sleep(0.01)
    refused = await keyed.post()
    assert refused.status_code == 429
    assert refused.json()["error"]["message"].startswith("Rate limit reached for concurrent requests")
    started = time.monotonic()
    async with openai.AsyncOpenAI(
        base_url=keyed.gateway.url + "/v1", api_key=keyed.secret, max_retries=3
    ) as sdk:
        answer = await sdk.chat.completions.create(
            model="deepseek-chat", messages=[{"role": "user", "content": "Hi"}]
        )
    assert answer.choices[0].message.content
    assert time.monotonic() - started >= 0.3  # it waited for the slot, as Retry-After said
    assert (await holder).status_code == 200


def test_limits_for_merges_key_overrides_with_defaults() -> None:
    options = Options(requests_per_minute=10, tokens_per_minute=0, concurrent_requests=4)
    assert options.limits_for(None) == RateLimits(requests_per_minute=10, concurrent_requests=4)


def test_reset_durations_read_like_openais() -> None:
    assert [duration(s) for s in (0.25, 1, 19.2, 60, 65)] == ["250ms", "1s", "20s", "1m0s", "1m5s"]


def through_two_workers(write_config, server_process, per_minute: int, count: int) -> list[httpx.Response]:  # type: ignore[no-untyped-def]
    """``count`` mock-chat requests of one key, each on a new connection to a two-worker server."""
    limit = f"[surfaces.openai_compat]\nrequests_per_minute = {per_minute}\n"
    config = write_config(replace={"[surfaces.openai_compat]\n": limit})
    url = server_process(config, "--workers", "2")
    secret = chatgate(
        "keys", "create", "--email", "w@example.com", "--balance", "100", "--config", str(config), check=True
    )
    headers = {"Authorization": f"Bearer {secret.stdout.splitlines()[-1]}"}
    # A fresh connection per request, so the two workers take turns accepting them.
    with httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        body = {**BODY, "model": "mock-chat"}
        return [client.post("/v1/chat/completions", json=body, headers=headers) for _ in range(count)]


def test_two_workers_share_one_limit_not_one_each(write_config: Callable[..., Path], server_process) -> None:  # type: ignore[no-untyped-def]
    # The gateways' most common complaint: a limit per worker process is the limit times the workers.
    statuses = [r.status_code for r in through_two_workers(write_config, server_process, 6, 12)]
    assert statuses.count(200) == 6, statuses
    assert statuses.count(429) == 6, statuses
