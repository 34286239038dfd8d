"""The echo provider proves itself with chatgate's provider conformance suite."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from chatgate_echo import EchoProvider

from core import PROVIDER_ERRORS, BadRequest, ChatMessage, ChatRequest, complete
from core.testing.provider_suite import ProviderConformance


class TestEchoConformance(ProviderConformance):
    model = "parrot"
    # Nothing upstream to fail; the suite skips these kinds, giving the reason.
    cannot_fail = dict.fromkeys(PROVIDER_ERRORS, "echo has no upstream to fail")

    @pytest_asyncio.fixture
    async def provider(self) -> AsyncIterator[EchoProvider]:
        provider = EchoProvider("parrot", EchoProvider.Options())
        await provider.open()
        yield provider
        await provider.aclose()


async def test_it_says_back_what_it_was_told() -> None:
    provider = EchoProvider("parrot", EchoProvider.Options(prefix="you said: "))
    said = (ChatMessage(role="user", content="hello plugin"),)
    completion = await complete(provider, ChatRequest(model="parrot", messages=said))
    assert completion.content == "you said: hello plugin"


async def test_a_request_without_user_text_is_a_bad_request() -> None:
    provider = EchoProvider("parrot", EchoProvider.Options())
    system_only = (ChatMessage(role="system", content="be brief"),)
    with pytest.raises(BadRequest, match="needs a user message"):
        await complete(provider, ChatRequest(model="parrot", messages=system_only))
