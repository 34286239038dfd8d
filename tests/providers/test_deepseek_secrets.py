"""No part of the upstream key, and no password in a ``base_url``, reaches a client or a log line.

Upstreams quote the key they were sent in their error messages (OpenAI: "Incorrect API
key provided: sk-abc***wxyz", DeepSeek: "Your api key: ****wxyz is invalid"); chatgate
passes upstream messages on to clients, so it must take those pieces out first. Shown
over real HTTP: the official openai SDK against a gateway in front of the fake DeepSeek.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from core.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import ADMIN_HEADERS, PRICED_MODELS, WITH_ADMIN, RunningGateway, chatgate, free_port

KEY = "sk-Qz7vLw2RkX9mTb4Np8Hc"
PASSWORD = "hunter2-Xq9Lp7Zr"
ASK = [{"role": "user", "content": "Hello?"}]


def pieces(secret: str, size: int = 4) -> set[str]:
    return {secret[i : i + size] for i in range(len(secret) - size + 1)}


def assert_hidden(text: str, secret: str = KEY) -> None:
    leaked = sorted(p for p in pieces(secret) if p in text)
    assert not leaked, f"pieces of the secret in: {text!r}"


def provider(url: str, *, key: str = KEY, extra: str = "") -> str:
    return f"""
[providers.deepseek]
plugin = "deepseek"
base_url = "{url}"
api_key = "{key}"
backoff = 0.01
{extra}
"""


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(api_key=KEY) as fake:
        yield fake


async def start(
    write_config: Callable[..., Path],
    gateway_factory: Callable[..., object],
    providers: str,
    caplog: pytest.LogCaptureFixture,
    models: str = PRICED_MODELS,
) -> tuple[RunningGateway, str]:
    gateway: RunningGateway = await gateway_factory(write_config(providers + models, replace=WITH_ADMIN))  # type: ignore[assignment,misc]
    # Litestar's logging set-up at start replaces the root logger's handlers, caplog's among them.
    logging.getLogger().addHandler(caplog.handler)
    key, secret = await gateway.services.accounts.create_key("caller@example.com")
    await gateway.services.billing.top_up(key.user_id, 100_000_000)
    return gateway, secret


async def failure(
    gateway: RunningGateway, secret: str, model: str = "deepseek-chat", **extra: Any
) -> openai.APIStatusError:
    """What the SDK raises for a chat completion the upstream refuses."""
    async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=secret, max_retries=0) as sdk:
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk.chat.completions.create(model=model, messages=ASK, **extra)  # type: ignore[call-overload]
    return caught.value


def seen_by_client(error: openai.APIStatusError) -> str:
    return f"{error.message} {error.body} {error.response.text}"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("status", "echo", "retries"),
    [(401, "masked", 0), (401, "full", 0), (400, "full", 0), (429, "masked", 1), (503, "full", 1)],
)
async def test_an_upstream_that_echoes_the_key_never_shows_it_to_the_client_or_the_log(
    write_config: Callable[..., Path],
    gateway_factory: Callable[..., object],
    upstream: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    status: int,
    echo: str,
    retries: int,
    stream: bool,
) -> None:
    gateway, secret = await start(
        write_config, gateway_factory, provider(upstream.url, extra=f"max_retries = {retries}"), caplog
    )
    upstream.scenario = Scenario(status=status, echo_key=echo)  # type: ignore[arg-type]
    error = await failure(gateway, secret, stream=stream)
    assert len(upstream.requests) == retries + 1
    said = upstream.requests[-1].headers["authorization"]
    assert said == f"Bearer {KEY}"  # the key was sent, and the fake echoes it...
    assert "[redacted]" in error.message  # ...in a message the client sees, redacted
    assert_hidden(seen_by_client(error))
    assert_hidden(caplog.text)
    if retries:
        assert "retry 1 of 1" in caplog.text  # the retry's log line quotes the upstream's message


async def test_deepseeks_own_answer_to_a_wrong_key_hides_its_last_four_characters(
    write_config: Callable[..., Path],
    gateway_factory: Callable[..., object],
    upstream: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = "sk-Wr0ngKeyAbCdEfGh12"
    gateway, secret = await start(write_config, gateway_factory, provider(upstream.url, key=wrong), caplog)
    error = await failure(gateway, secret)
    assert "Your api key: [redacted] is invalid" in error.message
    assert_hidden(seen_by_client(error), wrong)
    assert_hidden(caplog.text, wrong)


async def test_a_password_in_base_url_is_sent_as_basic_auth_and_shown_nowhere(
    write_config: Callable[..., Path],
    gateway_factory: Callable[..., object],
    upstream: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = upstream.url.removeprefix("http://")
    closed = f"127.0.0.1:{free_port()}"
    providers = f"""
[providers.proxied]
plugin = "openai_compatible"
base_url = "http://deploy:{PASSWORD}@{host}"
models = ["via-proxy"]
max_retries = 0

[providers.lost]
plugin = "openai_compatible"
base_url = "http://deploy:{PASSWORD}@{host}/wrong"
models = ["via-typo"]
max_retries = 0

[providers.gone]
plugin = "openai_compatible"
base_url = "http://deploy:{PASSWORD}@{closed}/v1"
models = ["via-nowhere"]
max_retries = 0
"""
    models = """
[models.via-proxy]
provider = "proxied"
[models.via-nowhere]
provider = "gone"
[models.via-typo]
provider = "lost"
"""
    gateway, secret = await start(write_config, gateway_factory, providers, caplog, models)
    health = await gateway.client.get("/healthz", headers=ADMIN_HEADERS)
    assert health.json()["providers"]["lost"]["base_url"] == f"http://***@{host}/wrong"
    assert_hidden(health.text, PASSWORD)

    error = await failure(gateway, secret, model="via-proxy")  # the fake wants a Bearer key: 401
    assert upstream.requests[-1].headers["authorization"].startswith("Basic ")  # the password went there
    assert_hidden(seen_by_client(error), PASSWORD)
    error = await failure(gateway, secret, model="via-typo")  # no /wrong/chat/completions there: 404
    assert f"is base_url 'http://***@{host}/wrong' right?" in error.message
    assert_hidden(seen_by_client(error), PASSWORD)
    async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=secret, max_retries=0) as sdk:
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk.chat.completions.create(model="via-nowhere", messages=ASK)  # type: ignore[arg-type]
    assert f"cannot connect to http://***@{closed}/v1" in caught.value.message
    assert_hidden(seen_by_client(caught.value), PASSWORD)
    assert_hidden(caplog.text, PASSWORD)


def test_configuration_errors_about_base_url_do_not_print_its_password(
    write_config: Callable[..., Path],
) -> None:
    for base_url in (f"ftp://deploy:{PASSWORD}@example.com/v1", f"https://deploy:{PASSWORD}@example.com/v1"):
        config = write_config(provider(base_url) + PRICED_MODELS)
        result = chatgate("check", "--config", str(config))
        assert result.returncode == 2, result.stdout
        assert "providers.deepseek" in result.stderr
        assert_hidden(result.stdout + result.stderr, PASSWORD)
    # The second one is refused because a key and a password would both be the Authorization header.
    assert "no user:password@ when api_key is set" in result.stderr
