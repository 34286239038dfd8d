"""Fallback chains, configured in plugins.toml and run against two fake upstreams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path

import pytest

from core.errors import BadRequest, Unavailable
from core.fallbacks import Fallbacks
from core.testing.fake_upstream import FakeUpstream, Scenario
from core.types import ChatMessage, ChatRequest, ContentDelta, Finish, ProviderEvent
from tests.conftest import (
    ADMIN_HEADERS,
    FAKE_DEEPSEEK_KEY,
    WITH_ADMIN,
    RunningGateway,
    chatgate,
    deepseek_config,
)

MODELS = """
[models.deepseek-chat]
provider = "deepseek"
"""


@pytest.fixture
async def backup() -> AsyncIterator[FakeUpstream]:
    """A second upstream, with a key of its own."""
    async with FakeUpstream(api_key="sk-backup-key-5678") as fake:
        yield fake


@pytest.fixture
async def chained(
    fake_deepseek: FakeUpstream,
    backup: FakeUpstream,
    write_config: Callable[..., Path],
    gateway_factory: Callable[..., object],
) -> RunningGateway:
    """A gateway whose ``deepseek`` instance falls back to an ``openai_compatible`` one."""
    config = write_config(
        deepseek_config(fake_deepseek.url, extra='max_retries = 0\nfallbacks = ["backup"]')
        + f"""
[providers.backup]
plugin = "openai_compatible"
base_url = "{backup.url}/v1"
api_key = "sk-backup-key-5678"
backoff = 0.01

[providers.backup.aliases]
deepseek-chat = {{ model = "deepseek-v4-pro" }}
"""
        + MODELS,
        replace=WITH_ADMIN,
    )
    return await gateway_factory(config)  # type: ignore[no-any-return,misc]


async def reply(gateway: RunningGateway, into: list[ProviderEvent] | None = None) -> list[ProviderEvent]:
    events: list[ProviderEvent] = [] if into is None else into
    route = gateway.services.catalog.route("deepseek-chat")
    request = ChatRequest(model="deepseek-chat", messages=(ChatMessage(role="user", content="Hi"),))
    async with aclosing(route.provider.stream(request)) as stream:
        async for event in stream:
            events.append(event)
    return events


async def test_a_retryable_failure_before_the_reply_falls_back(
    chained: RunningGateway, fake_deepseek: FakeUpstream, backup: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(status=503)
    backup.scenario = Scenario(content="From the backup.")
    events = await reply(chained)
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "From the backup."
    assert isinstance(events[-1], Finish)
    assert len(fake_deepseek.requests) == 1
    assert [r.body["model"] for r in backup.requests] == ["deepseek-v4-pro"]
    assert backup.requests[0].path == "/v1/chat/completions"
    assert backup.requests[0].headers["authorization"] == "Bearer sk-backup-key-5678"


async def test_a_failure_after_the_reply_began_does_not_fall_back(
    chained: RunningGateway, fake_deepseek: FakeUpstream, backup: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(disconnect_after=3)
    events: list[ProviderEvent] = []
    with pytest.raises(Unavailable):
        await reply(chained, into=events)
    assert events, "the partial reply arrived"
    assert backup.requests == []


async def test_a_non_retryable_failure_does_not_fall_back(
    chained: RunningGateway, fake_deepseek: FakeUpstream, backup: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(status=400)
    with pytest.raises(BadRequest):
        await reply(chained)
    assert backup.requests == []


async def test_when_every_instance_fails_the_last_error_is_raised(
    chained: RunningGateway, fake_deepseek: FakeUpstream, backup: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(status=503)
    backup.scenario = Scenario(status=500)
    with pytest.raises(Unavailable, match="answered 500"):
        await reply(chained)
    assert len(backup.requests) == 3  # the backup's own retries ran


async def test_healthz_shows_the_chain_and_no_key(chained: RunningGateway) -> None:
    health = (await chained.client.get("/healthz", headers=ADMIN_HEADERS)).json()
    assert health["providers"]["deepseek"]["fallbacks"] == ["backup"]
    assert health["providers"]["deepseek"]["api_key"] == "set"
    assert health["providers"]["backup"]["plugin"] == "openai_compatible"
    assert isinstance(chained.services.catalog.route("deepseek-chat").provider, Fallbacks)
    text = str(health)
    assert FAKE_DEEPSEEK_KEY not in text
    assert "sk-backup-key-5678" not in text


def test_fallbacks_must_name_other_configured_instances(write_config: Callable[..., Path]) -> None:
    config = write_config(
        '[providers.solo]\nplugin = "mock"\nfallbacks = ["solo", "nosuch"]\n'
        '[providers.odd]\nplugin = "mock"\nfallbacks = "mock"\n'
    )
    result = chatgate("check", "--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert any(
        "providers.solo.fallbacks.0: expected the name of another configured provider" in line
        and 'found "solo"' in line
        for line in lines
    ), lines
    assert any("providers.solo.fallbacks.1:" in line and 'found "nosuch"' in line for line in lines), lines
    assert any(
        "providers.odd.fallbacks: expected a list of provider instance names" in line for line in lines
    ), lines


def test_a_fallback_named_twice_is_an_error(write_config: Callable[..., Path]) -> None:
    config = write_config('[providers.twice]\nplugin = "mock"\nfallbacks = ["mock", "mock"]\n')
    result = chatgate("check", "--config", str(config))
    assert result.returncode == 2
    assert (
        'providers.twice.fallbacks.1: expected each instance named once, found "mock" again' in result.stderr
    )
