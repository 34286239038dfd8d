"""The DeepSeek provider inside the gateway: lifespan, routing, interrupts, errors kept in the record."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

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
