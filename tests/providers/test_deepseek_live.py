"""The DeepSeek provider against the real API: runs only when DEEPSEEK_API_KEY is set.

    DEEPSEEK_API_KEY=sk-... python -m pytest -m network

It spends a few hundred tokens. It checks what the fake cannot: that the
aliases in the default plugins.toml still name models DeepSeek serves, and
that DeepSeek's answers still parse.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import ClassVar

import msgspec
import pytest
import pytest_asyncio

from core import PROVIDER_ERRORS, Provider, complete
from core.config import load_config, validate_options
from core.errors import AuthenticationFailed
from core.testing.provider_suite import ProviderConformance
from core.types import ChatMessage, ChatRequest
from providers.deepseek import DeepSeekOptions, DeepSeekProvider

KEY = os.environ.get("DEEPSEEK_API_KEY", "")

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(not KEY, reason="set DEEPSEEK_API_KEY to run the live DeepSeek checks"),
]


def default_options(**changes: object) -> DeepSeekOptions:
    """The deepseek table of the shipped plugins.toml, as an operator gets it."""
    config = load_config(Path(__file__).parents[2] / "plugins.toml", env={"DEEPSEEK_API_KEY": KEY})
    options = validate_options(config, config.providers["deepseek"], DeepSeekProvider.Options)
    return msgspec.structs.replace(options, **changes)


@asynccontextmanager
async def live(**changes: object) -> AsyncIterator[DeepSeekProvider]:
    provider = DeepSeekProvider("deepseek", default_options(**changes))
    await provider.open()
    try:
        yield provider
    finally:
        await provider.aclose()


class TestLiveDeepSeekConformance(ProviderConformance):
    model = "deepseek-chat"
    secret = KEY
    prompt_timeout = 120.0
    cannot_fail: ClassVar[Mapping[str, str]] = {
        kind: f"the real API cannot be made to fail with {kind} on demand"
        for kind in PROVIDER_ERRORS
        if kind != "authentication"
    }

    @pytest_asyncio.fixture
    async def provider(self) -> AsyncIterator[Provider]:
        async with live() as provider:
            yield provider

    @pytest.fixture
    def failing(self) -> Callable[[str], AbstractAsyncContextManager[Provider]]:
        @asynccontextmanager
        async def failing(kind: str) -> AsyncIterator[Provider]:
            async with live(api_key="sk-chatgate-live-test-wrong-key") as provider:
                yield provider

        return failing


async def test_reasoner_alias_thinks_and_reports_reasoning_tokens() -> None:
    request = ChatRequest(
        model="deepseek-reasoner",
        messages=(
            ChatMessage(role="user", content="How many letters r are in 'strawberry'? Answer briefly."),
        ),
        max_tokens=2048,
    )
    async with live() as provider:
        completion = await complete(provider, request)
    assert completion.reasoning
    assert "3" in completion.content or "three" in completion.content.lower()
    assert completion.finish.usage.reasoning_tokens > 0


async def test_a_wrong_key_is_an_authentication_error_without_the_key() -> None:
    wrong = "sk-chatgate-live-test-wrong-key"
    async with live(api_key=wrong) as provider:
        with pytest.raises(AuthenticationFailed) as caught:
            await complete(
                provider,
                ChatRequest(model="deepseek-chat", messages=(ChatMessage(role="user", content="Hi"),)),
            )
    assert wrong not in str(caught.value)
