"""The mock provider: the provider contract, plus what makes it feel like a real model."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from typing import Any

import msgspec
import pytest
import pytest_asyncio

from core import Provider
from core.errors import PROVIDER_ERRORS, BadRequest, ProviderError, RateLimited
from core.testing.provider_suite import ProviderConformance
from core.tokens import estimate_prompt_tokens, is_cjk
from core.types import ChatMessage, ChatRequest, ContentDelta, Finish, ProviderEvent, ReasoningDelta
from providers.mock import MockProvider, register_providers, split_tokens

ENGLISH = "How should I structure a small Python web service?"
CHINESE = "怎样组织一个小型的网络服务项目比较好？"


def mock(**options: Any) -> MockProvider:
    """A mock provider with zero delays unless the test asks for some."""
    options = {"first_token_delay": 0, "token_delay": 0, **options}
    return MockProvider("mock", msgspec.convert(options, MockProvider.Options))


def ask(text: str = ENGLISH, model: str = "mock-chat", **fields: Any) -> ChatRequest:
    return ChatRequest(model=model, messages=(ChatMessage(role="user", content=text),), **fields)


async def collect(provider: Provider, request: ChatRequest) -> list[ProviderEvent]:
    async with aclosing(provider.stream(request)) as events:
        return [event async for event in events]


async def drain(provider: Provider, request: ChatRequest, into: list[ProviderEvent]) -> None:
    """Read a stream into ``into``, so a test sees what arrived before an error."""
    async with aclosing(provider.stream(request)) as events:
        async for event in events:
            into.append(event)


def text_of(events: list[ProviderEvent], kind: type[ContentDelta | ReasoningDelta] = ContentDelta) -> str:
    return "".join(e.text for e in events if isinstance(e, kind))


def cjk_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(is_cjk(c) for c in letters) / len(letters)


class ZeroDelayMock:
    @pytest_asyncio.fixture
    async def provider(self) -> AsyncIterator[MockProvider]:
        provider = mock()
        await provider.open()
        yield provider
        await provider.aclose()
        assert provider.active_streams == 0, "a stream was left running"

    @pytest.fixture
    def failing(self) -> Callable[[str], AbstractAsyncContextManager[Provider]]:
        @asynccontextmanager
        async def make(kind: str) -> AsyncIterator[Provider]:
            provider = mock(fail=kind)
            await provider.open()
            yield provider
            await provider.aclose()

        return make

    async def upstream_streams(self, provider: Provider) -> int | None:
        assert isinstance(provider, MockProvider)
        return provider.active_streams


class TestMockConformance(ZeroDelayMock, ProviderConformance):
    model = "mock-chat"


class TestMockReasonerConformance(ZeroDelayMock, ProviderConformance):
    """The thinking model, named by a fixture rather than an attribute (the suite accepts both)."""

    @pytest.fixture
    def model(self) -> str:
        return "mock-reasoner"


def test_registers_itself_and_describes_its_models() -> None:
    assert register_providers() == [MockProvider]
    provider = mock(models=["a", "b"], thinking_models=["b"])
    assert list(provider.models()) == ["a", "b"]
    assert provider.describe() == {"plugin": "mock", "models": ["a", "b"]}


def test_defaults_serve_a_chat_and_a_reasoning_model() -> None:
    options = MockProvider.Options()
    assert options.models == ["mock-chat", "mock-reasoner"]
    assert options.thinking_models == ["mock-reasoner"]
    assert (options.first_token_delay, options.token_delay) == (0.2, 0.02)


class TestReplies:
    async def test_same_input_gives_identical_events(self) -> None:
        request = ask(model="mock-reasoner")
        assert await collect(mock(), request) == await collect(mock(), request)

    async def test_different_input_gives_a_different_reply(self) -> None:
        one = text_of(await collect(mock(), ask("What is the best way to learn Rust?")))
        other = text_of(await collect(mock(), ask("Why do cats purr when they are happy?")))
        assert one != other

    async def test_the_reply_depends_on_the_model(self) -> None:
        provider = mock(models=["a", "b"])
        assert text_of(await collect(provider, ask(model="a"))) != text_of(
            await collect(provider, ask(model="b"))
        )

    async def test_english_question_gets_an_english_reply_about_it(self) -> None:
        reply = text_of(await collect(mock(), ask(ENGLISH)))
        assert not any(is_cjk(c) for c in reply)
        assert "structure a small Python web" in reply
        assert 2 <= reply.count(". ") + reply.count("? ") + reply.count("! ") + 1 <= 4

    async def test_chinese_question_gets_a_chinese_reply_about_it(self) -> None:
        reply = text_of(await collect(mock(), ask(CHINESE)))
        assert cjk_share(reply) > 0.9
        assert "小型的网络服务" in reply

    async def test_chinese_naming_latin_terms_is_still_chinese(self) -> None:
        reply = text_of(await collect(mock(), ask("请解释一下Python的GIL是什么")))
        assert cjk_share(reply) > 0.8

    async def test_language_follows_the_last_user_message(self) -> None:
        request = ChatRequest(
            model="mock-chat",
            messages=(
                ChatMessage(role="user", content=CHINESE),
                ChatMessage(role="assistant", content="好的。"),
                ChatMessage(
                    role="user", content=[{"type": "text", "text": "Now answer in English, please."}]
                ),
            ),
        )
        reply = text_of(await collect(mock(), request))
        assert not any(is_cjk(c) for c in reply)

    async def test_a_greeting_is_greeted_back(self) -> None:
        assert text_of(await collect(mock(), ask("Hello!"))).startswith(("Hello", "Hi"))
        assert text_of(await collect(mock(), ask("你好"))).startswith(("你好", "嗨"))

    async def test_english_streams_in_words_with_their_spaces(self) -> None:
        events = await collect(mock(), ask(ENGLISH))
        tokens = [e.text for e in events if isinstance(e, ContentDelta)]
        assert len(tokens) > 10
        assert all(t.strip() and " " not in t.strip() for t in tokens)
        assert any(t.startswith(" ") for t in tokens)

    async def test_chinese_streams_one_or_two_characters_a_token(self) -> None:
        events = await collect(mock(), ask(CHINESE))
        tokens = [e.text for e in events if isinstance(e, ContentDelta) and is_cjk(e.text[0])]
        assert all(1 <= len(t) <= 2 for t in tokens)
        assert {len(t) for t in tokens} == {1, 2}

    @pytest.mark.parametrize(
        "text", ["Hello, world!  Two  spaces.\n", "中文和English混合，共 3 句。", "  ", ""]
    )
    def test_tokens_concatenate_back_to_the_text(self, text: str) -> None:
        assert "".join(split_tokens(text, random.Random(1))) == text


class TestReasoning:
    async def test_thinking_models_reason_before_answering(self) -> None:
        events = await collect(mock(), ask(model="mock-reasoner"))
        kinds = [type(e) for e in events]
        first_content = kinds.index(ContentDelta)
        assert set(kinds[:first_content]) == {ReasoningDelta}
        assert ReasoningDelta not in kinds[first_content:]
        assert "structure a small Python web" in text_of(events, ReasoningDelta)

    async def test_reasoning_follows_the_language(self) -> None:
        events = await collect(mock(), ask(CHINESE, model="mock-reasoner"))
        assert cjk_share(text_of(events, ReasoningDelta)) > 0.9

    async def test_other_models_do_not_reason(self) -> None:
        events = await collect(mock(), ask(model="mock-chat"))
        assert not any(isinstance(e, ReasoningDelta) for e in events)

    async def test_usage_counts_every_delta(self) -> None:
        request = ask(model="mock-reasoner")
        events = await collect(mock(), request)
        finish = events[-1]
        assert isinstance(finish, Finish)
        assert finish.reason == "stop"
        assert finish.usage.prompt_tokens == estimate_prompt_tokens(request.messages)
        assert finish.usage.reasoning_tokens == sum(isinstance(e, ReasoningDelta) for e in events) > 0
        assert finish.usage.completion_tokens == len(events) - 1


class TestLimits:
    async def test_max_tokens_cuts_the_reply(self) -> None:
        events = await collect(mock(), ask(max_tokens=5))
        assert [type(e) for e in events] == [ContentDelta] * 5 + [Finish]
        assert isinstance(events[-1], Finish)
        assert events[-1].reason == "length"
        assert events[-1].usage.completion_tokens == 5

    async def test_max_tokens_counts_reasoning(self) -> None:
        events = await collect(mock(), ask(model="mock-reasoner", max_tokens=3))
        assert [type(e) for e in events] == [ReasoningDelta] * 3 + [Finish]
        assert isinstance(events[-1], Finish)
        assert events[-1].reason == "length"

    async def test_max_tokens_beyond_the_reply_finishes_normally(self) -> None:
        full = await collect(mock(), ask())
        exact = await collect(mock(), ask(max_tokens=len(full) - 1))
        assert exact == full
        assert isinstance(full[-1], Finish)
        assert full[-1].reason == "stop"

    async def test_max_tokens_below_one_is_rejected(self) -> None:
        with pytest.raises(BadRequest, match="max_tokens"):
            await collect(mock(), ask(max_tokens=0))

    async def test_stop_sequence_truncates_before_it(self) -> None:
        full = text_of(await collect(mock(), ask()))
        stop = full.split()[4]
        events = await collect(mock(), ask(stop=("never there", stop)))
        assert text_of(events) == full[: full.index(stop)]
        assert isinstance(events[-1], Finish)
        assert events[-1].reason == "stop"


class TestFailures:
    @pytest.mark.parametrize("kind", sorted(PROVIDER_ERRORS))
    async def test_fails_before_the_first_token(self, kind: str) -> None:
        events: list[ProviderEvent] = []
        with pytest.raises(ProviderError) as caught:
            await drain(mock(fail=kind), ask(model="mock-reasoner"), events)
        assert type(caught.value) is PROVIDER_ERRORS[kind]
        assert caught.value.status == PROVIDER_ERRORS[kind].status
        assert caught.value.message
        assert events == []

    @pytest.mark.parametrize("kind", sorted(PROVIDER_ERRORS))
    async def test_fails_after_some_content_tokens(self, kind: str) -> None:
        events: list[ProviderEvent] = []
        with pytest.raises(PROVIDER_ERRORS[kind]):
            await drain(mock(fail=kind, fail_after_tokens=3), ask(model="mock-reasoner"), events)
        assert sum(isinstance(e, ContentDelta) for e in events) == 3
        assert isinstance(events[-1], ContentDelta)
        assert not any(isinstance(e, Finish) for e in events)

    async def test_fails_at_the_end_when_the_reply_is_shorter(self) -> None:
        events: list[ProviderEvent] = []
        with pytest.raises(PROVIDER_ERRORS["unavailable"]):
            await drain(mock(fail="unavailable", fail_after_tokens=10_000), ask(), events)
        assert events
        assert not any(isinstance(e, Finish) for e in events)

    async def test_rate_limit_carries_retry_after_and_custom_message(self) -> None:
        provider = mock(fail="rate_limited", retry_after=7.5, fail_message="slow down")
        with pytest.raises(RateLimited, match="slow down") as caught:
            await collect(provider, ask())
        assert caught.value.retry_after == 7.5
        assert caught.value.status == 429

    async def test_unknown_model_is_a_bad_request_naming_the_served_ones(self) -> None:
        with pytest.raises(BadRequest, match="gpt-9") as caught:
            await collect(mock(), ask(model="gpt-9"))
        assert "mock-chat" in caught.value.message
        assert "mock-reasoner" in caught.value.message


class TestOptions:
    @pytest.mark.parametrize(
        ("options", "named"),
        [
            ({"first_token_delay": -1}, "first_token_delay"),
            ({"token_delay": -0.5}, "token_delay"),
            ({"fail_after_tokens": -1}, "fail_after_tokens"),
            ({"tokn_delay": 0.1}, "tokn_delay"),
            ({"fail": "exploded"}, "fail"),
        ],
    )
    def test_invalid_options_are_rejected_naming_the_field(self, options: dict[str, Any], named: str) -> None:
        with pytest.raises(msgspec.ValidationError, match=named):
            msgspec.convert(options, MockProvider.Options)

    def test_every_error_kind_is_an_option(self) -> None:
        for kind in PROVIDER_ERRORS:
            assert msgspec.convert({"fail": kind}, MockProvider.Options).fail == kind


class TestTiming:
    async def test_first_token_waits_first_token_delay(self) -> None:
        provider = mock(first_token_delay=0.3)
        started = time.monotonic()
        async with aclosing(provider.stream(ask())) as events:
            await anext(events)
            elapsed = time.monotonic() - started
        assert 0.3 <= elapsed < 1.5

    async def test_tokens_are_spaced_by_token_delay(self) -> None:
        provider = mock(token_delay=0.02)
        started = time.monotonic()
        events = await collect(provider, ask(max_tokens=10))
        elapsed = time.monotonic() - started
        assert len(events) == 11
        assert 9 * 0.02 <= elapsed < 1.5

    async def test_closing_early_stops_producing(self) -> None:
        provider = mock(token_delay=0.01)
        async with aclosing(provider.stream(ask())) as events:
            await anext(events)
        produced = provider.tokens_streamed
        await asyncio.sleep(0.1)
        assert provider.tokens_streamed == produced == 1
        assert provider.active_streams == 0

    async def test_cancelling_the_consumer_stops_producing(self) -> None:
        provider = mock(token_delay=0.01)
        first = asyncio.Event()

        async def consume() -> None:
            async with aclosing(provider.stream(ask())) as events:
                async for _ in events:
                    first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        produced = provider.tokens_streamed
        await asyncio.sleep(0.1)
        assert provider.tokens_streamed == produced
        assert provider.active_streams == 0
