"""The DeepSeek / OpenAI-compatible provider, over real HTTP against the fake DeepSeek server."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio

from core import Provider, complete
from core.config import load_config, validate_options
from core.errors import (
    AuthenticationFailed,
    BadRequest,
    ProviderError,
    RateLimited,
    Timeout,
    Unavailable,
    UpstreamBalanceExhausted,
)
from core.plugins import Plugins
from core.testing.fake_upstream import FakeUpstream, Scenario, ToolCallSpec
from core.testing.provider_suite import ProviderConformance
from core.types import (
    ChatMessage,
    ChatRequest,
    ContentDelta,
    Finish,
    ProviderEvent,
    ReasoningDelta,
    ToolCall,
    ToolCallDelta,
)
from providers.deepseek import DeepSeekProvider
from providers.deepseek import register_providers as register_deepseek
from providers.openai_compatible import OpenAICompatibleProvider
from providers.openai_compatible import register_providers as register_openai_compatible
from tests.conftest import free_port

KEY = "sk-fake-0123456789abcdef"
ALIASES = {
    "deepseek-chat": {"model": "deepseek-v4-flash", "extra_body": {"thinking": {"type": "disabled"}}},
    "deepseek-reasoner": {"model": "deepseek-v4-flash", "extra_body": {"thinking": {"type": "enabled"}}},
}


def make(fake: FakeUpstream, cls: type[OpenAICompatibleProvider] = DeepSeekProvider, **options: Any) -> Any:
    """A provider pointed at ``fake`` with fast retries; ``options`` override."""
    settings: dict[str, Any] = {
        "base_url": fake.url,
        "api_key": KEY,
        "aliases": ALIASES,
        "backoff": 0.01,
        "max_backoff": 0.05,
        **options,
    }
    return cls("deepseek", msgspec.convert(settings, cls.Options))


@asynccontextmanager
async def opened(provider: OpenAICompatibleProvider) -> AsyncIterator[OpenAICompatibleProvider]:
    await provider.open()
    try:
        yield provider
    finally:
        await provider.aclose()


def ask(text: str = "Why is the sky blue?", model: str = "deepseek-chat", **fields: Any) -> ChatRequest:
    return ChatRequest(model=model, messages=(ChatMessage(role="user", content=text),), **fields)


async def collect(provider: Provider, request: ChatRequest, into: list[ProviderEvent] | None = None) -> list:
    events: list[ProviderEvent] = [] if into is None else into
    async with asyncio.timeout(20), aclosing(provider.stream(request)) as stream:
        async for event in stream:
            events.append(event)
    return events


def text(events: list[ProviderEvent], kind: type = ContentDelta) -> str:
    return "".join(e.text for e in events if isinstance(e, kind))


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(api_key=KEY) as server:
        yield server


@pytest_asyncio.fixture
async def deepseek(fake: FakeUpstream) -> AsyncIterator[OpenAICompatibleProvider]:
    async with opened(make(fake)) as provider:
        yield provider


# --- the conformance suite, against the fake ---


class FakeBacked:
    secret = KEY

    @pytest_asyncio.fixture
    async def provider(self, fake: FakeUpstream) -> AsyncIterator[Provider]:
        self.fake = fake
        async with opened(make(fake)) as provider:
            yield provider

    @pytest.fixture
    def failing(self, fake: FakeUpstream) -> Callable[[str], AbstractAsyncContextManager[Provider]]:
        statuses = {
            "bad_request": 400,
            "authentication": 401,
            "insufficient_balance": 402,
            "rate_limited": 429,
            "unavailable": 503,
        }

        @asynccontextmanager
        async def failing(kind: str) -> AsyncIterator[Provider]:
            if kind == "timeout":
                fake.scenario = Scenario(first_token_delay=2.0)
                provider = make(fake, first_token_timeout=0.2, max_retries=0)
            else:
                fake.scenario = Scenario(status=statuses[kind])
                provider = make(fake, max_retries=0)
            async with opened(provider):
                yield provider

        return failing

    async def upstream_streams(self, provider: Provider) -> int | None:
        return self.fake.active_streams


class TestDeepSeekConformance(FakeBacked, ProviderConformance):
    model = "deepseek-chat"


class TestDeepSeekReasonerConformance(FakeBacked, ProviderConformance):
    model = "deepseek-reasoner"


class TestOpenAIStyleUsageConformance(FakeBacked, ProviderConformance):
    """An OpenAI-style server: usage on a trailing chunk, served as ``openai_compatible``."""

    model = "deepseek-v4-pro"

    @pytest_asyncio.fixture
    async def provider(self, fake: FakeUpstream) -> AsyncIterator[Provider]:
        self.fake = fake
        fake.scenario = Scenario(usage="trailer_chunk", thinking=False)
        async with opened(make(fake, OpenAICompatibleProvider, aliases={})) as provider:
            yield provider


# --- registration and configuration ---


def test_registers_deepseek_and_openai_compatible() -> None:
    # One class per module, each module its own entry point: no class is registered twice.
    assert register_deepseek() == [DeepSeekProvider]
    assert register_openai_compatible() == [OpenAICompatibleProvider]
    registered = Plugins.load().providers
    assert (registered["deepseek"].cls, registered["deepseek"].plugin) == (DeepSeekProvider, "deepseek")
    assert (registered["openai_compatible"].cls, registered["openai_compatible"].plugin) == (
        OpenAICompatibleProvider,
        "openai_compatible",
    )
    assert DeepSeekProvider.name == "deepseek"
    assert OpenAICompatibleProvider.name == "openai_compatible"
    assert issubclass(DeepSeekProvider, OpenAICompatibleProvider)
    assert DeepSeekProvider.Options().base_url == "https://api.deepseek.com"
    with pytest.raises(msgspec.ValidationError, match="base_url"):
        msgspec.convert({}, OpenAICompatibleProvider.Options)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"base_url": "api.deepseek.com"}, "base_url to start with http"),
        ({"idle_timeout": 0}, "idle_timeout to be > 0"),
        ({"max_retries": -1}, "max_retries to be >= 0"),
        ({"max_connections": -1}, "max_connections to be >= 0"),
        ({"headers": {"Authorization": "Bearer x"}}, "headers not to set Authorization"),
    ],
)
def test_options_are_checked(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=problem):
        msgspec.convert(options, DeepSeekProvider.Options)


@pytest.mark.parametrize(
    ("model", "thinking"), [("deepseek-chat", "disabled"), ("deepseek-reasoner", "enabled")]
)
async def test_the_default_config_keeps_the_seed_model_names_working(
    fake: FakeUpstream, model: str, thinking: str
) -> None:
    config = load_config(Path(__file__).parents[2] / "plugins.toml", env={"DEEPSEEK_API_KEY": KEY})
    assert config.models[model].provider == "deepseek"
    options = validate_options(config, config.providers["deepseek"], DeepSeekProvider.Options)
    assert options.base_url == "https://api.deepseek.com"
    assert options.api_key == KEY
    local = msgspec.structs.replace(options, base_url=fake.url)
    async with opened(DeepSeekProvider("deepseek", local)) as provider:
        events = await collect(provider, ask(model=model))
    assert isinstance(events[-1], Finish)
    body = fake.requests[-1].body
    assert body["model"] == "deepseek-v4-flash"
    assert body["thinking"] == {"type": thinking}
    assert any(isinstance(e, ReasoningDelta) for e in events) == (thinking == "enabled")


def test_describe_names_the_upstream_and_models_but_not_the_key(fake: FakeUpstream) -> None:
    provider = make(fake, models=["deepseek-v4-pro"])
    assert provider.describe() == {
        "plugin": "deepseek",
        "base_url": fake.url,
        "models": ["deepseek-chat", "deepseek-reasoner", "deepseek-v4-pro"],
        "api_key": "set",
    }


# --- streaming, parsed exactly ---


async def test_thinking_streams_reasoning_then_content_with_deepseek_usage(
    fake: FakeUpstream, deepseek: OpenAICompatibleProvider
) -> None:
    fake.scenario = Scenario(reasoning="Count the r letters.", content="There are 3 r's.")
    events = await collect(deepseek, ask("How many r in strawberry?", model="deepseek-reasoner"))
    kinds = [type(e) for e in events]
    first_content = kinds.index(ContentDelta)
    assert set(kinds[:first_content]) == {ReasoningDelta}
    assert set(kinds[first_content:-1]) == {ContentDelta}
    assert text(events, ReasoningDelta) == "Count the r letters."
    assert text(events) == "There are 3 r's."
    finish = events[-1]
    assert isinstance(finish, Finish)
    assert finish.reason == "stop"
    deltas = len(events) - 1
    assert finish.usage.completion_tokens == deltas
    assert finish.usage.reasoning_tokens == kinds.count(ReasoningDelta)
    assert finish.usage.prompt_tokens > 0
    # DeepSeek's own counters are kept for the ledger.
    assert {"prompt_cache_hit_tokens", "prompt_cache_miss_tokens"} <= set(finish.usage.extra)
    assert finish.usage.cached_tokens == finish.usage.extra["prompt_cache_hit_tokens"]
    assert "estimated" not in finish.usage.extra


async def test_alias_maps_the_model_and_merges_its_body(
    fake: FakeUpstream, deepseek: OpenAICompatibleProvider
) -> None:
    events = await collect(deepseek, ask(model="deepseek-chat"))
    body = fake.requests[-1].body
    assert body["model"] == "deepseek-v4-flash"
    assert body["thinking"] == {"type": "disabled"}
    assert not any(isinstance(e, ReasoningDelta) for e in events)
    await collect(deepseek, ask(model="deepseek-reasoner"))
    assert fake.requests[-1].body["thinking"] == {"type": "enabled"}
    # A name without an alias goes upstream unchanged.
    await collect(deepseek, ask(model="deepseek-v4-pro"))
    assert fake.requests[-1].body["model"] == "deepseek-v4-pro"
    assert "thinking" not in fake.requests[-1].body


async def test_an_alias_body_cannot_ask_for_more_output_than_the_request(fake: FakeUpstream) -> None:
    aliases = {"deepseek-chat": {"model": "deepseek-v4-flash", "extra_body": {"max_tokens": 100_000}}}
    async with opened(make(fake, aliases=aliases)) as provider:
        await collect(provider, ask(max_tokens=64))
        assert fake.requests[-1].body["max_tokens"] == 64  # what was reserved
        await collect(provider, ask())  # a request without a cap takes the alias's
        assert fake.requests[-1].body["max_tokens"] == 100_000


async def test_openai_style_trailing_usage_chunk_is_read(
    fake: FakeUpstream, deepseek: OpenAICompatibleProvider
) -> None:
    fake.scenario = Scenario(usage="trailer_chunk")
    events = await collect(deepseek, ask())
    finish = events[-1]
    assert isinstance(finish, Finish)
    assert finish.usage.completion_tokens == len(events) - 1
    assert "estimated" not in finish.usage.extra


async def test_a_server_without_usage_gets_an_estimate_not_a_free_reply(
    fake: FakeUpstream, deepseek: OpenAICompatibleProvider
) -> None:
    fake.scenario = Scenario(usage="absent", content="A reply of a few words for the estimate.")
    events = await collect(deepseek, ask())
    usage = events[-1].usage
    assert usage.extra == {"estimated": True}
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0


async def test_keep_alive_comments_before_the_first_token_are_skipped(
    fake: FakeUpstream, deepseek: OpenAICompatibleProvider
) -> None:
    fake.scenario = Scenario(keepalives=4, keepalive_interval=0.02, content="Hello there.")
    events = await collect(deepseek, ask())
    assert text(events) == "Hello there."
    assert isinstance(events[-1], Finish)


async def test_tool_calls_pass_through(fake: FakeUpstream, deepseek: OpenAICompatibleProvider) -> None:
    arguments = '{"location": "San Francisco", "unit": "celsius"}'
    fake.scenario = Scenario(tool_call=ToolCallSpec(name="weather", arguments=arguments))
    tools = ({"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}},)
    request = ask("Weather in SF?", model="deepseek-reasoner", tools=tools, tool_choice="auto")
    events = await collect(deepseek, request)
    fragments = [e for e in events if isinstance(e, ToolCallDelta)]
    assert len(fragments) > 1, "arguments should arrive in pieces"
    assert fragments[0].id
    assert fragments[0].id.startswith("call_")
    assert fragments[0].name == "weather"
    assert "".join(f.arguments for f in fragments) == arguments
    assert events[-1].reason == "tool_calls"
    completion = await complete(deepseek, request)
    assert [(c.name, c.arguments) for c in completion.tool_calls] == [("weather", arguments)]
    assert fake.requests[-1].body["tools"] == list(tools)


async def test_a_json_answer_with_blank_keep_alive_lines_parses(
    fake: FakeUpstream, deepseek: OpenAICompatibleProvider
) -> None:
    fake.scenario = Scenario(
        json_for_stream=True,
        keepalives=3,
        keepalive_interval=0.02,
        reasoning="Think first.",
        content="Then answer.",
    )
    events = await collect(deepseek, ask(model="deepseek-reasoner"))
    assert [type(e) for e in events] == [ReasoningDelta, ContentDelta, Finish]
    assert text(events, ReasoningDelta) == "Think first."
    assert text(events) == "Then answer."
    assert events[-1].usage.reasoning_tokens > 0


async def test_finish_reason_beyond_openai_is_kept(
    fake: FakeUpstream, deepseek: OpenAICompatibleProvider
) -> None:
    fake.scenario = Scenario(finish_reason="insufficient_system_resource")
    events = await collect(deepseek, ask())
    assert events[-1].reason == "insufficient_system_resource"


async def test_max_tokens_cuts_the_reply_with_length(
    fake: FakeUpstream, deepseek: OpenAICompatibleProvider
) -> None:
    events = await collect(deepseek, ask(max_tokens=3))
    assert events[-1].reason == "length"
    assert events[-1].usage.completion_tokens == 3


# --- broken answers are typed errors, never hangs ---


async def test_an_empty_200_body_is_an_error_and_retried(fake: FakeUpstream) -> None:
    fake.scenario = Scenario(empty_body=True)
    async with opened(make(fake, max_retries=2)) as provider:
        with pytest.raises(Unavailable, match="empty body"):
            await collect(provider, ask())
    assert len(fake.requests) == 3


async def test_an_empty_200_then_a_good_answer_succeeds(fake: FakeUpstream) -> None:
    fake.script(Scenario(empty_body=True))
    async with opened(make(fake)) as provider:
        events = await collect(provider, ask())
    assert isinstance(events[-1], Finish)
    assert text(events)
    assert len(fake.requests) == 2


async def test_a_stream_cut_mid_reply_keeps_what_arrived_and_is_not_retried(
    fake: FakeUpstream, deepseek: OpenAICompatibleProvider
) -> None:
    fake.scenario = Scenario(disconnect_after=3)
    events: list[ProviderEvent] = []
    with pytest.raises(Unavailable, match="middle of the reply") as caught:
        await collect(deepseek, ask(), into=events)
    assert 0 < len(events) <= 3  # the fake counts its opening role chunk as an event
    assert not any(isinstance(e, Finish) for e in events)
    assert caught.value.retryable  # as an error kind; but a reply had begun, so:
    assert len(fake.requests) == 1


async def test_a_malformed_event_is_an_error_naming_it(
    fake: FakeUpstream, deepseek: OpenAICompatibleProvider
) -> None:
    fake.scenario = Scenario(malformed_after=2)
    events: list[ProviderEvent] = []
    with pytest.raises(Unavailable, match="not a chat-completion chunk") as caught:
        await collect(deepseek, ask(), into=events)
    assert "oops" in str(caught.value)
    assert 0 < len(events) <= 2


async def test_connection_refused_is_unavailable_after_retries() -> None:
    port = free_port()
    options = {"base_url": f"http://127.0.0.1:{port}", "api_key": KEY, "backoff": 0.01, "max_retries": 2}
    provider = DeepSeekProvider("deepseek", msgspec.convert(options, DeepSeekProvider.Options))
    async with opened(provider):
        with pytest.raises(Unavailable, match="cannot connect"):
            await collect(provider, ask())


# --- requests ---


async def test_standard_fields_and_unknown_extras_pass_through(
    fake: FakeUpstream, deepseek: OpenAICompatibleProvider
) -> None:
    request = ChatRequest(
        model="deepseek-chat",
        messages=(
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content="Hi", name="ann"),
        ),
        temperature=0.7,
        top_p=0.9,
        max_tokens=50,
        stop=("END",),
        seed=7,
        presence_penalty=0.1,
        frequency_penalty=0.2,
        response_format={"type": "json_object"},
        user="user-42",
        extra={
            "logit_bias": {"42": 1},
            "reasoning_effort": "high",
            "stream_options": {"include_obfuscation": False},
            "stream": False,  # the provider owns streaming
            "model": "other",  # and the model
        },
    )
    await collect(deepseek, request)
    received = fake.requests[-1]
    body = received.body
    assert body["model"] == "deepseek-v4-flash"
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi", "name": "ann"},
    ]
    expected = {
        "stream": True,
        "stream_options": {"include_obfuscation": False, "include_usage": True},
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 50,
        "stop": ["END"],
        "seed": 7,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "response_format": {"type": "json_object"},
        "user": "user-42",
        "logit_bias": {"42": 1},
        "reasoning_effort": "high",
        "thinking": {"type": "disabled"},
    }
    assert {k: body[k] for k in expected} == expected
    assert received.headers["authorization"] == f"Bearer {KEY}"
    assert received.headers["content-type"] == "application/json"


async def test_reasoning_goes_back_only_on_tool_call_turns(
    fake: FakeUpstream, deepseek: OpenAICompatibleProvider
) -> None:
    call = ToolCall(id="call_00_abc", name="weather", arguments='{"location": "SF"}')
    messages = (
        ChatMessage(role="user", content="Hello"),
        ChatMessage(role="assistant", content="Hi!", reasoning="Greet back."),
        ChatMessage(role="user", content="Weather in SF?"),
        ChatMessage(role="assistant", content=None, reasoning="Use the tool.", tool_calls=(call,)),
        ChatMessage(role="tool", content='{"temp": 18}', tool_call_id="call_00_abc"),
        ChatMessage(role="assistant", content=None, tool_calls=(call,)),  # reasoning lost upstream of us
        ChatMessage(role="tool", content='{"temp": 18}', tool_call_id="call_00_abc"),
    )
    # The fake enforces DeepSeek's V4 rule in thinking mode: it answers 400 if a tool turn lacks it.
    events = await collect(deepseek, ChatRequest(model="deepseek-reasoner", messages=messages))
    assert isinstance(events[-1], Finish)
    sent = fake.requests[-1].body["messages"]
    assert "reasoning_content" not in sent[1]
    assert sent[3]["reasoning_content"] == "Use the tool."
    assert sent[3]["content"] == ""
    assert sent[3]["tool_calls"] == [
        {
            "id": "call_00_abc",
            "type": "function",
            "function": {"name": "weather", "arguments": '{"location": "SF"}'},
        }
    ]
    assert sent[4] == {"role": "tool", "content": '{"temp": 18}', "tool_call_id": "call_00_abc"}
    assert sent[5]["reasoning_content"] == ""


# --- errors and retries ---


@pytest.mark.parametrize(
    ("status", "error", "upstream_message"),
    [
        (400, BadRequest, "Invalid"),
        (401, AuthenticationFailed, "Authentication Fails"),
        (402, UpstreamBalanceExhausted, "Insufficient Balance"),
        (422, BadRequest, "Invalid"),
        (429, RateLimited, "Rate Limit"),
        (500, Unavailable, "Server Error"),
        (503, Unavailable, "Server Overloaded"),
    ],
)
async def test_statuses_map_to_typed_errors_carrying_the_upstream_message(
    fake: FakeUpstream, status: int, error: type[ProviderError], upstream_message: str
) -> None:
    fake.scenario = Scenario(status=status)
    async with opened(make(fake, max_retries=0)) as provider:
        with pytest.raises(ProviderError) as caught:
            await collect(provider, ask())
    assert type(caught.value) is error
    assert caught.value.upstream_status == status
    assert upstream_message.lower() in str(caught.value).lower()
    assert str(status) in str(caught.value)
    assert KEY not in str(caught.value)


async def test_a_wrong_key_fails_authentication_without_leaking_either_key(fake: FakeUpstream) -> None:
    wrong = "sk-wrong-key-9999aaaa"
    async with opened(make(fake, api_key=wrong)) as provider:
        with pytest.raises(AuthenticationFailed) as caught:
            await collect(provider, ask())
    message = str(caught.value)
    assert "Authentication Fails" in message
    assert "api_key" in message
    assert wrong not in message
    assert KEY not in message
    assert len(fake.requests) == 1  # a bad key is not retried


async def test_deepseek_without_a_key_says_which_variable_to_set(fake: FakeUpstream) -> None:
    async with opened(make(fake, api_key="")) as provider:
        with pytest.raises(AuthenticationFailed, match="DEEPSEEK_API_KEY"):
            await collect(provider, ask())
    assert fake.requests == []
    assert provider.describe()["api_key"] == "not set"


async def test_a_needed_key_without_a_known_variable_says_to_set_api_key(fake: FakeUpstream) -> None:
    class KeyedServer(OpenAICompatibleProvider):
        needs_key = True

    async with opened(make(fake, KeyedServer, api_key="")) as provider:
        with pytest.raises(AuthenticationFailed, match=r"set api_key in \[providers\.deepseek\]") as caught:
            await collect(provider, ask())
    assert "DEEPSEEK_API_KEY" not in str(caught.value)  # the generic class knows no vendor's variable
    assert fake.requests == []


async def test_retryable_failures_are_retried_honouring_retry_after(fake: FakeUpstream) -> None:
    fake.script(Scenario(status=429, retry_after="0.3"), Scenario(status=503))
    async with opened(make(fake, max_retries=2)) as provider:
        started = time.monotonic()
        events = await collect(provider, ask())
    assert isinstance(events[-1], Finish)
    assert len(fake.requests) == 3
    assert fake.requests[1].at - fake.requests[0].at >= 0.29  # Retry-After, not the 10 ms backoff
    assert time.monotonic() - started < 5


async def test_backoff_grows_exponentially_with_jitter(fake: FakeUpstream) -> None:
    fake.scenario = Scenario(status=500)
    async with opened(make(fake, max_retries=3, backoff=0.1, max_backoff=10)) as provider:
        with pytest.raises(Unavailable):
            await collect(provider, ask())
    times = [r.at for r in fake.requests]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 3
    for attempt, gap in enumerate(gaps):
        nominal = 0.1 * 2**attempt
        assert nominal * 0.5 - 0.01 <= gap <= nominal + 0.1, gaps


async def test_non_retryable_failures_are_not_retried(fake: FakeUpstream) -> None:
    fake.scenario = Scenario(status=400)
    async with opened(make(fake, max_retries=3)) as provider:
        with pytest.raises(BadRequest):
            await collect(provider, ask())
    assert len(fake.requests) == 1


async def test_a_long_retry_after_is_handed_to_the_caller_instead_of_waited(fake: FakeUpstream) -> None:
    fake.scenario = Scenario(status=429, retry_after="120")
    async with opened(make(fake, max_retries=3, max_retry_after=30)) as provider:
        with pytest.raises(RateLimited) as caught:
            await collect(provider, ask())
    assert caught.value.retry_after == 120
    assert len(fake.requests) == 1


async def test_retry_log_lines_name_the_failure_but_never_the_key(
    fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    fake.script(Scenario(status=503))
    caplog.set_level(logging.DEBUG)
    async with opened(make(fake)) as provider:
        await collect(provider, ask())
    retries = [r.getMessage() for r in caplog.records if "retry 1 of 2" in r.getMessage()]
    assert retries
    assert "503" in retries[0]
    assert "Server Overloaded" in retries[0]
    assert all(KEY not in r.getMessage() for r in caplog.records)


# --- timeouts ---


async def test_first_token_timeout_ignores_keep_alives(fake: FakeUpstream) -> None:
    # A queued request: keep-alive comments keep coming, no token does.
    fake.scenario = Scenario(keepalives=50, keepalive_interval=0.05)
    async with opened(make(fake, first_token_timeout=0.3, max_retries=0)) as provider:
        started = time.monotonic()
        with pytest.raises(Timeout, match="no first token"):
            await collect(provider, ask())
    assert time.monotonic() - started < 1.5


async def test_idle_timeout_fires_when_a_flowing_reply_stalls_and_is_not_retried(fake: FakeUpstream) -> None:
    fake.scenario = Scenario(stall_after=2)
    events: list[ProviderEvent] = []
    async with opened(make(fake, idle_timeout=0.2)) as provider:
        with pytest.raises(Timeout, match="stalled"):
            await collect(provider, ask(), into=events)
    assert 0 < len(events) <= 2
    assert len(fake.requests) == 1


async def test_total_timeout_bounds_a_slow_reply(fake: FakeUpstream) -> None:
    fake.scenario = Scenario(tokens=200, token_delay=0.02)
    async with opened(make(fake, total_timeout=0.3, idle_timeout=5)) as provider:
        started = time.monotonic()
        with pytest.raises(Timeout):
            await collect(provider, ask())
    assert time.monotonic() - started < 1.0


async def test_timeouts_before_the_first_token_are_retried(fake: FakeUpstream) -> None:
    fake.script(Scenario(delay=1.0))
    async with opened(make(fake, first_token_timeout=0.2, max_retries=1)) as provider:
        events = await collect(provider, ask())
    assert isinstance(events[-1], Finish)
    assert len(fake.requests) == 2


# --- connections and cancellation ---


async def test_one_keep_alive_connection_serves_sequential_requests(
    fake: FakeUpstream, deepseek: OpenAICompatibleProvider
) -> None:
    for _ in range(5):
        await collect(deepseek, ask())
    assert len(fake.requests) == 5
    assert fake.connections == 1


async def test_the_pool_size_bounds_concurrent_upstream_connections(fake: FakeUpstream) -> None:
    fake.scenario = Scenario(tokens=10, token_delay=0.02)
    async with opened(make(fake, max_connections=2)) as provider:
        await asyncio.gather(*(collect(provider, ask()) for _ in range(6)))
    assert len(fake.requests) == 6
    assert fake.connections == 2


@pytest.mark.parametrize("how", ["close", "cancel"])
async def test_the_upstream_sees_a_stopped_consumer_within_100_ms(
    fake: FakeUpstream, deepseek: OpenAICompatibleProvider, how: str
) -> None:
    fake.scenario = Scenario(tokens=100, token_delay=0.5)
    first = asyncio.Event()
    stream = deepseek.stream(ask())
    stopped = 0.0

    async def consume() -> None:
        nonlocal stopped
        async with aclosing(stream):
            async for event in stream:
                if isinstance(event, ContentDelta):
                    first.set()
                    if how == "close":
                        stopped = time.monotonic()
                        return

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)
    if how == "cancel":
        await asyncio.sleep(0.05)  # parked in the upstream read, as a consumer of a slow reply is
        stopped = time.monotonic()
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    noticed = await fake.wait_for_disconnect(timeout=2)
    assert 0 < noticed - stopped < 0.1, f"the fake saw the disconnect {noticed - stopped:.3f} s later"
    async with asyncio.timeout(1):
        while fake.active_streams:  # noqa: ASYNC110 - the fake exposes a count
            await asyncio.sleep(0.005)


async def test_open_and_close_manage_one_client(fake: FakeUpstream) -> None:
    provider = make(fake)
    with pytest.raises(Unavailable, match="not open"):
        await collect(provider, ask())
    await provider.open()
    client = provider._client
    await collect(provider, ask())
    await collect(provider, ask())
    assert provider._client is client
    await provider.aclose()
    assert client is not None
    assert client.closed


async def test_a_slow_consumer_is_not_mistaken_for_a_stalled_upstream(fake: FakeUpstream) -> None:
    fake.scenario = Scenario(tokens=6)
    events: list[ProviderEvent] = []
    provider = make(fake, idle_timeout=0.1, first_token_timeout=0.1)
    async with opened(provider), aclosing(provider.stream(ask())) as stream:
        async for event in stream:
            events.append(event)
            await asyncio.sleep(0.15)  # longer than idle_timeout, between every two reads
    assert isinstance(events[-1], Finish)


async def test_an_outside_cancellation_is_not_reported_as_a_timeout(fake: FakeUpstream) -> None:
    fake.scenario = Scenario(first_token_delay=5)
    async with opened(make(fake, first_token_timeout=0.2, max_retries=0)) as provider:
        task = asyncio.create_task(collect(provider, ask()))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_reply_nobody_streams_is_asked_for_in_one_piece(fake: FakeUpstream) -> None:
    # Slower than first_token_timeout: without a stream there is no first token to time.
    fake.scenario = Scenario(thinking=True, tokens=5, delay=0.2)
    async with opened(make(fake, first_token_timeout=0.05, max_retries=0)) as provider:
        events = await collect(provider, ask(model="deepseek-reasoner", stream=False))
    body = fake.requests[-1].body
    assert body["stream"] is False
    assert "stream_options" not in body  # OpenAI refuses stream_options without a stream
    assert isinstance(events[-1], Finish)
    assert events[-1].usage.completion_tokens > 0
    assert not events[-1].usage.extra.get("estimated")
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    assert "".join(e.text for e in events if isinstance(e, ContentDelta))
