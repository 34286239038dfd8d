"""The DeepSeek provider inside the gateway: lifespan, routing, interrupts, errors kept in the record."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from core import RateLimits
from core.testing.fake_upstream import FakeUpstream, Scenario
from core.types import ContentDelta
from tests.conftest import ADMIN_HEADERS, FAKE_DEEPSEEK_KEY, WITH_ADMIN, RunningGateway, deepseek_config
from tests.core.test_generations import start_reply

MODELS = """
[models.deepseek-chat]
provider = "deepseek"
input_price = 1000
output_price = 2000

[models.deepseek-reasoner]
provider = "deepseek"
"""


@pytest.fixture
async def gateway(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., object]
) -> RunningGateway:
    config = write_config(
        deepseek_config(fake_deepseek.url, extra="max_retries = 0") + MODELS, replace=WITH_ADMIN
    )
    return await gateway_factory(config)  # type: ignore[no-any-return,misc]


async def test_a_reply_from_deepseek_is_stored_with_its_reasoning_and_usage(
    gateway: RunningGateway, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(reasoning="Think.", content="Answer.")
    generation = await start_reply(gateway.services, "Hello?", model="deepseek-reasoner")
    outcome = await generation.wait()
    assert outcome.status == "complete"
    assert outcome.message.content == "Answer."
    assert outcome.message.reasoning == "Think."
    assert outcome.usage is not None
    assert outcome.usage.reasoning_tokens > 0
    assert fake_deepseek.requests[-1].body["thinking"] == {"type": "enabled"}


async def test_interrupting_a_reply_disconnects_the_upstream_within_100_ms(
    gateway: RunningGateway, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(tokens=200, token_delay=0.2)
    generation = await start_reply(gateway.services, "Tell me a long story", model="deepseek-chat")
    async for event in generation.follow():
        if isinstance(event, ContentDelta):
            break
    await asyncio.sleep(0.05)  # the runner is now waiting on the upstream's next token
    stopped = time.monotonic()
    assert await gateway.services.generations.interrupt(generation.conversation_id)
    noticed = await fake_deepseek.wait_for_disconnect(timeout=2)
    assert noticed - stopped < 0.1, f"the upstream saw the disconnect {noticed - stopped:.3f} s later"
    outcome = await generation.wait()
    assert outcome.status == "interrupted"
    assert outcome.message.content  # the partial reply is kept


async def test_an_upstream_failure_keeps_the_question_and_marks_the_reply(
    gateway: RunningGateway, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(status=402)
    generation = await start_reply(gateway.services, "Are you there?", model="deepseek-chat")
    outcome = await generation.wait()
    assert outcome.status == "error"
    assert "Insufficient Balance" in (outcome.message.error or "")
    assert FAKE_DEEPSEEK_KEY not in (outcome.message.error or "")
    transcript = await gateway.services.conversations.transcript(
        await gateway.services.conversations.store.get_conversation(generation.conversation_id)
    )
    assert [m.content for m in transcript.messages if m.role == "user"] == ["Are you there?"]


async def test_healthz_describes_the_provider_without_its_key(
    gateway: RunningGateway, fake_deepseek: FakeUpstream
) -> None:
    health = (await gateway.client.get("/healthz", headers=ADMIN_HEADERS)).json()
    assert health["providers"]["deepseek"] == {
        "plugin": "deepseek",
        "base_url": fake_deepseek.url,
        "models": ["deepseek-chat", "deepseek-reasoner"],
        "api_key": "set",
    }
    assert FAKE_DEEPSEEK_KEY not in str(health)


async def test_no_default_pool_queues_streams_the_server_can_carry(
    gateway: RunningGateway, fake_deepseek: FakeUpstream
) -> None:
    """150 concurrent streams (past aiohttp's default pool of 100) are all upstream at once."""
    key, secret = await gateway.services.accounts.create_key("many@example.com")
    await gateway.services.billing.top_up(key.user_id, 10**12)
    await gateway.services.billing.store.set_api_key_limits(
        key.id, RateLimits(requests_per_minute=0, tokens_per_minute=0, concurrent_requests=0)
    )
    fake_deepseek.scenario = Scenario(stall_after=1)  # every stream stays open after its first token
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"Authorization": f"Bearer {secret}"}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=gateway.url, limits=limits, timeout=60) as client:

        async def stream() -> None:
            async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as answer:
                async for _ in answer.aiter_bytes():
                    pass

        tasks = [asyncio.ensure_future(stream()) for _ in range(150)]
        try:
            async with asyncio.timeout(60):  # a bound for a capped pool, not a timing expectation
                while fake_deepseek.active_streams < 150:
                    assert not any(task.done() for task in tasks), [t.exception() for t in tasks if t.done()]
                    await asyncio.sleep(0.05)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    async with asyncio.timeout(30):  # the clients left: every upstream stream is closed
        while True:
            if fake_deepseek.active_streams == 0:
                break
            await asyncio.sleep(0.05)
