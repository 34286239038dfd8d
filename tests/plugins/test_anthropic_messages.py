"""POST /v1/messages and /v1/messages/count_tokens, driven by the official anthropic SDKs against a
live gateway and a fake DeepSeek upstream; research/dialects.md section E's bugs for this dialect, a test
each."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from pydantic import TypeAdapter

from core import (
    ContentDelta,
    Finish,
    LedgerEntry,
    ProviderEvent,
    RateLimits,
    ReasoningDelta,
    ToolCallDelta,
    Usage,
)
from core.testing.fake_upstream import FakeUpstream, Scenario, ToolCallSpec
from plugins.anthropic_messages import events, wire
from tests.conftest import PRICED_MODELS, RunningGateway, charges_settled, deepseek_config, funded_key

# deepseek-v4-flash is not an alias: the request's own `thinking` reaches the upstream.
V4 = """
[models.deepseek-v4-flash]
provider = "deepseek"
input_price = 1000
output_price = 2000
context_tokens = 65536
max_output_tokens = 4096
"""
SURFACE = "\n[surfaces.anthropic_messages]\n"
HI = [{"role": "user", "content": "Hi"}]
WEATHER = {
    "name": "weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
NODE = Path(__file__).parents[1] / "node"
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}


class Client:
    """A gateway with a funded key, and the official SDK pointed at it (the base URL has no /v1)."""

    def __init__(self, gateway: RunningGateway, key: str, user_id: int) -> None:
        self.gateway = gateway
        self.key = key
        self.user_id = user_id
        self.sdk = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=key, max_retries=0)

    async def post(self, body: Any, path: str = "/v1/messages", **headers: str) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.gateway.client.post(
            path,
            content=content,
            headers={"x-api-key": self.key, "content-type": "application/json", **headers},
        )

    async def ledger(self) -> list[LedgerEntry]:
        return await self.gateway.services.billing.store.list_ledger(self.user_id)

    async def balance(self) -> int:
        return (await self.gateway.services.accounts.get_user(self.user_id)).balance


async def start_client(gateway_factory: Callable[..., Any], config: Path) -> Client:
    gateway: RunningGateway = await gateway_factory(config)
    return Client(gateway, *await funded_key(gateway, "claude@example.com"))


@pytest.fixture
async def client(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., Any]
) -> AsyncIterator[Client]:
    config = write_config(
        deepseek_config(fake_deepseek.url, extra="max_retries = 0") + PRICED_MODELS + V4 + SURFACE
    )
    client = await start_client(gateway_factory, config)
    yield client
    await client.sdk.close()


async def settled(client: Client, count: int) -> list[LedgerEntry]:
    """The charges once ``count`` requests have settled."""
    return await charges_settled(client.gateway, client.user_id, count)


def sse(text: str) -> list[tuple[str | None, dict[str, Any]]]:
    """A stream's events as (event name, data) pairs."""
    out = []
    for raw in text.split("\n\n"):
        if not raw.strip():
            continue
        name, data = None, None
        for line in raw.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
        assert data is not None, raw
        out.append((name, data))
    return out


def upstream_messages(fake: FakeUpstream) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = fake.requests[-1].body["messages"]
    return messages


# --- the official SDK ---


async def test_create_answers_a_message_and_sends_the_upstream_a_chat_request(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(content="Hello from DeepSeek.")
    message = await client.sdk.messages.create(
        model="deepseek-chat",
        max_tokens=300,
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}],
            }
        ],
        extra_body={"temperature": 0.5, "top_k": 5},  # sampling fields left the SDK's signature
        stop_sequences=["END"],
        metadata={"user_id": "u-42"},
    )
    assert message.type == "message"
    assert message.id.startswith("msg_")
    assert message.role == "assistant"
    assert message.model == "deepseek-chat"
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", "Hello from DeepSeek.")]
    assert message.stop_reason == "end_turn"
    assert message.stop_sequence is None
    assert message.usage.input_tokens > 0
    assert message.usage.output_tokens > 0
    assert message.usage.cache_read_input_tokens == 0
    assert (message._request_id or "").startswith("req_")
    body = fake_deepseek.requests[-1].body
    assert body["messages"] == [
        {"role": "system", "content": "Be brief.\n\nBe kind."},
        {"role": "user", "content": "Hi"},
    ]
    assert (body["max_tokens"], body["temperature"], body["stop"], body["user"]) == (
        300,
        0.5,
        ["END"],
        "u-42",
    )
    assert not {"top_k", "metadata", "system"} & set(body)


async def test_stream_with_text_stream_and_get_final_message(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(reasoning="Think it over.", content="Streamed answer, piece by piece.")
    async with client.sdk.messages.stream(model="deepseek-reasoner", max_tokens=300, messages=HI) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Streamed answer, piece by piece."
    assert [b.type for b in final.content] == ["thinking", "text"]
    thinking, answer = final.content
    assert thinking.thinking == "Think it over."  # type: ignore[union-attr]
    assert thinking.signature == wire.signature("Think it over.")  # type: ignore[union-attr]
    assert answer.text == text  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    upstream = fake_deepseek.requests[-1].body
    assert final.usage.input_tokens > 0
    assert final.usage.output_tokens > 0
    assert upstream["stream"] is True


async def test_every_event_has_an_event_line_naming_its_type_and_blocks_are_in_order(client: Client) -> None:
    """Research E #1 and #2: the SDK drops events without `event:`; indices 0, 1, ... in start order."""
    body = {"model": "deepseek-reasoner", "max_tokens": 300, "messages": HI, "stream": True}
    response = await client.post(body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events_ = sse(response.text)
    assert all(name == data["type"] for name, data in events_)
    names = [name for name, _ in events_]
    assert names[0] == "message_start"
    assert names[-2:] == ["message_delta", "message_stop"]
    starts = [data["index"] for name, data in events_ if name == "content_block_start"]
    assert starts == list(range(len(starts))) == [0, 1]
    kinds = [data["content_block"]["type"] for name, data in events_ if name == "content_block_start"]
    assert kinds == ["thinking", "text"]
    # The signature_delta closes the thinking block, before its stop.
    signature_at = next(
        i for i, (_, d) in enumerate(events_) if d.get("delta", {}).get("type") == "signature_delta"
    )
    assert events_[signature_at + 1] == ("content_block_stop", {"type": "content_block_stop", "index": 0})


async def test_usage_reports_the_upstreams_input_tokens_never_zero(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    """Research E #5: message_start carries an estimate, message_delta the upstream's count."""
    body = {"model": "deepseek-chat", "max_tokens": 300, "messages": HI, "stream": True}
    response = await client.post(body)
    events_ = dict(sse(response.text))
    started = events_["message_start"]["message"]["usage"]
    delta = events_["message_delta"]["usage"]
    assert started["input_tokens"] > 0
    (charge,) = await settled(client, 1)
    assert delta["input_tokens"] + delta["cache_read_input_tokens"] == charge.prompt_tokens > 0
    assert delta["output_tokens"] == charge.completion_tokens > 0


def test_cached_prompt_tokens_are_reported_apart_from_input_tokens() -> None:
    usage = wire.usage_body(Usage(prompt_tokens=1000, completion_tokens=7, cached_tokens=640))
    assert usage == {
        "input_tokens": 360,
        "output_tokens": 7,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 640,
    }


# --- tools and thinking ---


@pytest.mark.parametrize("stream", [False, True])
async def test_a_tool_round_trip_carries_the_thinking_back_to_deepseek(
    client: Client, fake_deepseek: FakeUpstream, stream: bool
) -> None:
    """Research finding 6, E #6 and #7: thinking + tool_use out; the thinking block sent back reaches
    DeepSeek as reasoning_content on the assistant's tool-call turn, the result as a tool message."""
    arguments = '{"city": "Paris"}'
    fake_deepseek.scenario = Scenario(
        reasoning="I should call the tool.", tool_call=ToolCallSpec(name="weather", arguments=arguments)
    )
    ask: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    request: dict[str, Any] = {
        "model": "deepseek-v4-flash",
        "max_tokens": 2000,
        "tools": [WEATHER],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    if stream:
        async with client.sdk.messages.stream(messages=ask, **request) as streamed:
            first = await streamed.get_final_message()
    else:
        first = await client.sdk.messages.create(messages=ask, **request)
    sent = fake_deepseek.requests[-1].body
    assert (sent["thinking"], sent["reasoning_effort"]) == ({"type": "enabled"}, "high")
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "The weather in a city",
                "parameters": WEATHER["input_schema"],
            },
        }
    ]
    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == ["thinking", "tool_use"]  # no empty text block (E #8)
    call = first.content[1]
    assert call.name == "weather"  # type: ignore[union-attr]
    assert call.input == {"city": "Paris"}  # type: ignore[union-attr]
    assert call.id  # type: ignore[union-attr]

    fake_deepseek.scenario = Scenario(reasoning="Now answer.", content="It is sunny in Paris.")
    history = [
        *ask,
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 24 C"}],
        },  # type: ignore[union-attr]
    ]
    second = await client.sdk.messages.create(messages=history, **request)
    assert [b.text for b in second.content if b.type == "text"] == ["It is sunny in Paris."]
    assert second.stop_reason == "end_turn"
    assistant, tool = upstream_messages(fake_deepseek)[1:]
    assert assistant["role"] == "assistant"
    assert assistant["reasoning_content"] == "I should call the tool."
    assert not assistant["content"]
    (sent_call,) = assistant["tool_calls"]
    assert (sent_call["id"], sent_call["function"]["name"]) == (call.id, "weather")  # type: ignore[union-attr]
    assert json.loads(sent_call["function"]["arguments"]) == json.loads(arguments)
    assert tool == {"role": "tool", "content": "Sunny, 24 C", "tool_call_id": call.id}  # type: ignore[union-attr]
    charges = await settled(client, 2)
    assert len(charges) == 2  # charged once each


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_reason_is_tool_use_whenever_a_tool_block_was_sent(
    client: Client, fake_deepseek: FakeUpstream, stream: bool
) -> None:
    """Research finding 4, E #4: an upstream that says `stop` with a tool call still means tool_use."""
    fake_deepseek.scenario = Scenario(
        tool_call=ToolCallSpec(name="weather", arguments='{"city": "Oslo"}'), finish_reason="stop"
    )
    request: dict[str, Any] = {
        "model": "deepseek-chat",
        "max_tokens": 300,
        "tools": [WEATHER],
        "messages": HI,
    }
    if stream:
        async with client.sdk.messages.stream(**request) as streamed:
            message = await streamed.get_final_message()
    else:
        message = await client.sdk.messages.create(**request)
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["tool_use"]


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_names_too_long_for_the_upstream_are_shortened_and_given_back(
    client: Client, fake_deepseek: FakeUpstream, stream: bool
) -> None:
    """Research A.16 #12: MCP tool names pass OpenAI's 64 characters; the client sees its own."""
    long = "mcp__a_server_with_a_long_name__" + "and_a_tool_with_an_even_longer_name" * 2
    short = wire.upstream_tool_name(long)
    assert len(long) > 64 >= len(short)
    fake_deepseek.scenario = Scenario(tool_call=ToolCallSpec(name=short, arguments="{}"))
    tool = {"name": long, "input_schema": {"type": "object"}}
    history = [
        {"role": "user", "content": "Use it twice"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": long, "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "done"}]},
    ]
    request: dict[str, Any] = {
        "model": "deepseek-chat",
        "max_tokens": 100,
        "messages": history,
        "tools": [tool],
        "tool_choice": {"type": "tool", "name": long},
    }
    if stream:
        async with client.sdk.messages.stream(**request) as streamed:
            message = await streamed.get_final_message()
    else:
        message = await client.sdk.messages.create(**request)
    assert [(b.type, getattr(b, "name", None)) for b in message.content] == [("tool_use", long)]
    body = fake_deepseek.requests[-1].body
    assert body["tools"][0]["function"]["name"] == short
    assert body["tool_choice"] == {"type": "function", "function": {"name": short}}
    assert body["messages"][1]["tool_calls"][0]["function"]["name"] == short


async def test_tool_choice_and_parallel_calls_map_to_chat_fields(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    for choice, expected in [
        ({"type": "auto", "disable_parallel_tool_use": True}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "weather"}, {"type": "function", "function": {"name": "weather"}}),
    ]:
        await client.sdk.messages.create(
            model="deepseek-chat",
            max_tokens=50,
            messages=HI,
            tools=[WEATHER],
            tool_choice=choice,  # type: ignore[arg-type]
        )
        body = fake_deepseek.requests[-1].body
        assert body["tool_choice"] == expected
        assert body.get("parallel_tool_calls", True) is not choice.get("disable_parallel_tool_use", False)


async def test_thinking_disabled_and_redacted_thinking_dropped(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    history = [
        {"role": "user", "content": "First"},
        {
            "role": "assistant",
            "content": [
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "thinking", "thinking": "Foreign thought.", "signature": "EqQBCgIYAhIM"},
                {"type": "text", "text": "First answer."},
            ],
        },
        {"role": "user", "content": "Second"},
    ]
    message = await client.sdk.messages.create(
        model="deepseek-v4-flash",
        max_tokens=100,
        messages=history,
        thinking={"type": "disabled"},  # type: ignore[arg-type]
    )
    assert [b.type for b in message.content] == ["text"]  # the upstream did not think
    body = fake_deepseek.requests[-1].body
    assert body["thinking"] == {"type": "disabled"}
    assert body["messages"][1] == {
        "role": "assistant",
        "content": "First answer.",
    }  # DeepSeek drops plain turns' reasoning


async def test_tool_choice_without_tools_is_not_sent(client: Client, fake_deepseek: FakeUpstream) -> None:
    """A tool_choice (or parallel_tool_calls) about no tools: some upstreams refuse it (400)."""
    await client.sdk.messages.create(
        model="deepseek-chat",
        max_tokens=50,
        messages=HI,
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
    )
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(fake_deepseek.requests[-1].body)


THINKING = [
    {"type": "enabled", "budget_tokens": 1024},
    {"type": "enabled", "budget_tokens": 4095},
    {"type": "enabled", "budget_tokens": 4096},
    {"type": "enabled", "budget_tokens": 16383},
    {"type": "enabled", "budget_tokens": 16384},
    {"type": "enabled", "budget_tokens": 31999},
    {"type": "adaptive"},
    {"type": "disabled"},
]


async def ask_thinking(client: Client, fake: FakeUpstream) -> list[dict[str, Any]]:
    """The reasoning fields the upstream got for each of :data:`THINKING`."""
    sent = []
    for thinking in THINKING:
        await client.sdk.messages.create(
            model="deepseek-v4-flash",
            max_tokens=100,
            messages=HI,
            thinking=thinking,  # type: ignore[arg-type]
        )
        body = fake.requests[-1].body
        sent.append({k: body[k] for k in ("thinking", "reasoning_effort") if k in body})
    return sent


async def test_thinking_reaches_an_openai_style_upstream_as_reasoning_effort(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., Any]
) -> None:
    """Only DeepSeek takes `thinking` (another upstream answers 400): an enabled budget is
    reasoning_effort, low below 4096 tokens, medium below 16384, high from there; adaptive and
    disabled send nothing (no off switch is shared; adaptive is a model's own default)."""
    config = deepseek_config(fake_deepseek.url).replace('plugin = "deepseek"', 'plugin = "openai_compatible"')
    client = await start_client(gateway_factory, write_config(config + PRICED_MODELS + V4 + SURFACE))
    efforts = ["low", "low", "medium", "medium", "high", "high"]
    assert await ask_thinking(client, fake_deepseek) == [{"reasoning_effort": e} for e in efforts] + [{}, {}]
    await client.sdk.close()


async def test_deepseek_gets_its_thinking_switch_through_a_fallback_chain_too(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., Any]
) -> None:
    """The route's first instance decides the dialect, also when it has fallbacks."""
    config = deepseek_config(fake_deepseek.url, extra='fallbacks = ["mock"]')
    client = await start_client(gateway_factory, write_config(config + PRICED_MODELS + V4 + SURFACE))
    on = {"thinking": {"type": "enabled"}, "reasoning_effort": "high"}
    assert await ask_thinking(client, fake_deepseek) == [
        *[on] * 6,
        {"thinking": {"type": "enabled"}},
        {"thinking": {"type": "disabled"}},
    ]
    await client.sdk.close()


async def test_an_embedding_model_is_400_naming_model_and_reserves_nothing(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., Any]
) -> None:
    embedding = '\n[models.deepseek-embedding]\nprovider = "deepseek"\nkind = "embedding"\ninput_price = 1\n'
    config = deepseek_config(fake_deepseek.url) + PRICED_MODELS + embedding + SURFACE
    client = await start_client(gateway_factory, write_config(config))
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        response = await client.post({"model": "deepseek-embedding", "max_tokens": 10, "messages": HI}, path)
        message = assert_anthropic_error(response, 400, "invalid_request_error")
        assert message.startswith("model: 'deepseek-embedding' is an embedding model")
    assert fake_deepseek.requests == []
    assert [e.kind for e in await client.ledger()] == ["topup"]
    await client.sdk.close()


async def test_tool_results_go_first_each_with_a_message_even_without_text(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    """Research E #7: several results, a tool_reference-only one and an is_error one, then the user's text."""
    history = [
        {"role": "user", "content": "Do three things"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "On it."},
                {"type": "tool_use", "id": "call_1", "name": "a", "input": {}},
                {"type": "tool_use", "id": "call_2", "name": "b", "input": {"x": 1}},
                {"type": "tool_use", "id": "call_3", "name": "c", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Here you go."},
                {
                    "type": "tool_result",
                    "tool_use_id": "call_1",
                    "content": [{"type": "text", "text": "one"}],
                },
                {
                    "type": "tool_result",
                    "tool_use_id": "call_2",
                    "content": [{"type": "tool_reference", "tool_name": "b2"}],
                },
                {"type": "tool_result", "tool_use_id": "call_3", "content": "boom", "is_error": True},
            ],
        },
    ]
    await client.sdk.messages.create(model="deepseek-chat", max_tokens=100, messages=history)  # type: ignore[arg-type]
    messages = upstream_messages(fake_deepseek)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "tool", "user"]
    assert messages[1]["content"] == "On it."
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["call_1", "call_2", "call_3"]
    assert messages[1]["tool_calls"][1]["function"]["arguments"] == '{"x":1}'
    assert [(m["tool_call_id"], m["content"]) for m in messages[2:5]] == [
        ("call_1", "one"),
        ("call_2", "Tool loaded: b2"),
        ("call_3", "Error: boom"),
    ]
    assert messages[5] == {"role": "user", "content": "Here you go."}


def test_chatgates_thinking_signatures_are_recognised() -> None:
    """A thinking block chatgate emitted, echoed back unchanged, is known as its own; others are not
    (and are still passed on: a foreign signature keeps its text, research A.16 #5)."""
    ours = wire.ThinkingBlock("Let me think.", wire.signature("Let me think."))
    assert wire.signed_here(ours)
    assert not wire.signed_here(wire.ThinkingBlock("Let me think!", ours.signature))
    assert not wire.signed_here(wire.ThinkingBlock("Let me think.", "EqQBCgIYAhIM"))


def test_tool_ids_anthropic_would_refuse_are_encoded_and_decoded_back() -> None:
    """Research A.16 #3: ids like `functions.Bash:0` go out encoded, come back as they were."""
    for upstream in ["functions.Bash:0", "call_00_abc", "cgx_looks_encoded", "工具"]:
        sent = wire.tool_use_id(upstream)
        assert re.fullmatch(r"[A-Za-z0-9_-]+", sent)
        assert wire.upstream_tool_id(sent) == upstream
    assert wire.tool_use_id(None).startswith("toolu_")
    assert wire.tool_use_id(None) != wire.tool_use_id(None)


# --- the stream state machine ---


def accumulate(data: bytes) -> Any:
    """Feed a rendered stream through the anthropic SDK's own accumulator (what messages.stream runs)."""
    snapshot = None
    buffers: dict[int, bytes] = {}
    parse = TypeAdapter(RawMessageStreamEvent).validate_python
    for name, payload in sse(data.decode()):
        assert name == payload["type"]
        if name in ("ping", "error"):
            continue
        snapshot = accumulate_event(event=parse(payload), current_snapshot=snapshot, json_bufs=buffers)
    return snapshot


def render(provider_events: list[ProviderEvent]) -> bytes:
    blocks = events.Blocks("m")
    return blocks.start(3) + b"".join(blocks.feed(e) for e in provider_events)


def check_bookkeeping(data: bytes) -> None:
    """Blocks start at 0, 1, 2...; one open at a time; every delta matches its block's type."""
    open_: tuple[int, str] | None = None
    started = 0
    allowed = {
        "text": {"text_delta"},
        "thinking": {"thinking_delta", "signature_delta"},
        "tool_use": {"input_json_delta"},
    }
    for name, payload in sse(data.decode()):
        if name == "content_block_start":
            assert open_ is None
            assert payload["index"] == started
            open_ = (started, payload["content_block"]["type"])
            started += 1
        elif name == "content_block_delta":
            assert open_ is not None
            assert payload["index"] == open_[0]
            assert payload["delta"]["type"] in allowed[open_[1]]
            if payload["delta"]["type"] == "text_delta":
                assert payload["delta"]["text"]
        elif name == "content_block_stop":
            assert open_ is not None
            assert payload["index"] == open_[0]
            open_ = None
    assert open_ is None


FINISH = Finish("tool_calls", Usage(prompt_tokens=10, completion_tokens=20))


def test_tool_arguments_in_one_chunk_and_only_at_the_end() -> None:
    """Research E #3: every fragment is an input_json_delta; none rides only on content_block_start."""
    whole = render([ToolCallDelta(0, "call_a", "weather", '{"city": "Rome"}'), FINISH])
    assert accumulate(whole).content[0].input == {"city": "Rome"}
    late = render(
        [ToolCallDelta(0, "call_a", "weather", ""), ToolCallDelta(0, None, None, '{"city": "Rome"}'), FINISH]
    )
    assert accumulate(late).content[0].input == {"city": "Rome"}
    for data in (whole, late):
        start = next(p for n, p in sse(data.decode()) if n == "content_block_start")
        assert start["content_block"]["input"] == {}


def test_parallel_and_interleaved_tool_calls_become_separate_whole_blocks() -> None:
    """Research E #3: two calls never merge; interleaved fragments never interleave blocks."""
    data = render(
        [
            ToolCallDelta(0, "call_a", "weather", '{"ci'),
            ToolCallDelta(1, "call_b", "time", '{"zo'),
            ToolCallDelta(0, None, None, 'ty": "Rome"}'),
            ToolCallDelta(1, None, None, 'ne": "CET"}'),
            FINISH,
        ]
    )
    check_bookkeeping(data)
    message = accumulate(data)
    assert [(b.id, b.name, b.input) for b in message.content] == [
        ("call_a", "weather", {"city": "Rome"}),
        ("call_b", "time", {"zone": "CET"}),
    ]
    assert message.stop_reason == "tool_use"


def test_a_tool_call_whose_name_comes_late_waits_for_it() -> None:
    data = render(
        [
            ContentDelta("Let me see."),
            ToolCallDelta(0, None, None, '{"a": 1}'),
            ToolCallDelta(0, "c1", "f", ""),
            FINISH,
        ]
    )
    check_bookkeeping(data)
    message = accumulate(data)
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert (message.content[1].name, message.content[1].input) == ("f", {"a": 1})


def random_stream(rng: random.Random) -> tuple[list[ProviderEvent], dict[str, dict[str, Any]]]:
    """Reasoning, text and up to three tool calls (arguments cut anywhere, the name on any
    fragment), interleaved at random with empty deltas; and the calls' whole arguments by name."""
    queues: list[list[ProviderEvent]] = [
        [ReasoningDelta(rng.choice(["x", "y z", ""])) for _ in range(rng.randint(0, 4))],
        [ContentDelta(rng.choice(["a", "b c", "\n", ""])) for _ in range(rng.randint(0, 4))],
    ]
    calls: dict[str, dict[str, Any]] = {}
    for k in rng.sample(range(3), rng.randint(0, 3)):
        arguments = {"n": k, "s": "abc" * rng.randint(0, 3)}
        text = json.dumps(arguments)
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 4)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        named = 0 if rng.random() < 0.7 else rng.randrange(len(pieces))
        calls[f"f{k}"] = arguments
        queues.append(
            [
                ToolCallDelta(k, f"id{k}" if i == named else None, f"f{k}" if i == named else None, piece)
                for i, piece in enumerate(pieces)
            ]
        )
    stream: list[ProviderEvent] = []
    while any(queues):
        queue = rng.choice([q for q in queues if q])
        stream.append(queue.pop(0))
    reason = rng.choice(["stop", "length", "tool_calls"])
    return [*stream, Finish(reason, Usage(prompt_tokens=5, completion_tokens=5))], calls  # type: ignore[arg-type]


def test_any_interleaving_of_deltas_makes_a_valid_block_sequence() -> None:
    """Research E #2 and #3 (a property test): whatever order reasoning, text and tool-call
    fragments come in, the blocks are contiguous and well typed, and nothing is lost or merged."""
    rng = random.Random(19)
    for _ in range(500):
        stream, calls = random_stream(rng)
        data = render(stream)
        check_bookkeeping(data)
        message = accumulate(data)
        texts = "".join(e.text for e in stream if isinstance(e, ContentDelta))
        thoughts = "".join(e.text for e in stream if isinstance(e, ReasoningDelta))
        assert "".join(b.text for b in message.content if b.type == "text") == texts
        assert "".join(b.thinking for b in message.content if b.type == "thinking") == thoughts
        assert {b.name: b.input for b in message.content if b.type == "tool_use"} == calls
        assert (message.stop_reason == "tool_use") == bool(calls)
        for block in message.content:
            if block.type == "thinking":
                assert block.signature == wire.signature(block.thinking)


def test_an_upstream_out_of_resources_ends_the_stream_as_a_reply() -> None:
    """The reply is paid for: it ends as end_turn, never with an error the client would retry."""
    data = render([ContentDelta("Half"), Finish("insufficient_system_resource", Usage())])
    assert [name for name, _ in sse(data.decode())][-2:] == ["message_delta", "message_stop"]
    message = accumulate(data)
    assert (message.content[0].text, message.stop_reason) == ("Half", "end_turn")


def test_a_new_id_on_an_open_calls_index_is_another_call() -> None:
    """Some OpenAI-compatible servers give every parallel call index 0: a fragment with a new id
    starts another block, streamed and whole; fragments repeating the open call's id do not."""
    cases: list[list[ProviderEvent]] = [
        [
            ToolCallDelta(0, "call_a", "weather", '{"city": '),
            ToolCallDelta(0, "call_a", None, '"Rome"}'),  # the same id again: the same call
            ToolCallDelta(0, "call_b", "time", ""),
            ToolCallDelta(0, None, None, '{"zone": "CET"}'),
            FINISH,
        ],
        [  # text waiting behind the first call goes before the second; the second's name comes late
            ToolCallDelta(0, "call_a", "weather", '{"city": "Rome"}'),
            ContentDelta("Checking."),
            ToolCallDelta(0, "call_b", None, '{"zone": '),
            ToolCallDelta(0, None, "time", '"CET"}'),
            FINISH,
        ],
        [  # another call at index 1 is open when index 0 gets its second call
            ToolCallDelta(1, "call_c", "news", "{}"),
            ToolCallDelta(0, "call_a", "weather", '{"city": "Rome"}'),
            ToolCallDelta(0, "call_b", "time", '{"zone": "CET"}'),
            FINISH,
        ],
    ]
    expected = [("call_a", "weather", {"city": "Rome"}), ("call_b", "time", {"zone": "CET"})]
    for stream in cases:
        data = render(stream)
        check_bookkeeping(data)
        message = accumulate(data)
        calls = [(b.id, b.name, b.input) for b in message.content if b.type == "tool_use"]
        whole = wire.message_body("m", "", "", wire.gather_calls(stream), FINISH, {})
        gathered = [(b["id"], b["name"], b["input"]) for b in whole["content"]]
        if stream[0].index == 1:  # type: ignore[union-attr]
            assert calls == gathered == [("call_c", "news", {}), *expected]
        else:
            assert calls == gathered == expected
        assert message.stop_reason == whole["stop_reason"] == "tool_use"
    assert "".join(b.text for b in accumulate(render(cases[1])).content if b.type == "text") == "Checking."


# --- errors, each in Anthropic's shape with the status the SDK maps ---


def assert_anthropic_error(response: httpx.Response, status: int, type_: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == type_
    assert response.headers["request-id"] == body["request_id"]
    message: str = body["error"]["message"]
    return message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "deepseek-chat", "messages": HI}, "max_tokens: Field required"),
        ({"model": "deepseek-chat", "max_tokens": 10}, "messages: Field required"),
        ({"max_tokens": 10, "messages": HI}, "model: Field required"),
        ({"model": "deepseek-chat", "max_tokens": 0, "messages": HI}, "max_tokens: Expected `int` >= 1"),
        (
            {"model": "deepseek-chat", "max_tokens": 10, "messages": []},
            "messages: List should have at least 1 item",
        ),
        (
            {"model": "deepseek-chat", "max_tokens": 10, "messages": [{"role": "wizard", "content": "x"}]},
            "messages.0.role",
        ),
        (
            {"model": "deepseek-chat", "max_tokens": 10, "messages": [{"role": "user", "content": 5}]},
            "messages.0.content",
        ),
        (
            {"model": "deepseek-chat", "max_tokens": 10, "messages": [{"role": "user", "content": ""}]},
            "messages.0: user messages must have non-empty content",
        ),
        (
            {
                "model": "deepseek-chat",
                "max_tokens": 10,
                "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}],
            },
            "messages.0.content.0: chatgate does not take content blocks of type 'document'",
        ),
        ({"model": "deepseek-chat", "max_tokens": 10, "messages": HI, "temperature": 3}, "temperature"),
        ({"model": "deepseek-chat", "max_tokens": 10, "messages": HI, "stream": "yes"}, "stream"),
        (
            {
                "model": "deepseek-chat",
                "max_tokens": 10,
                "messages": HI,
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            },
            "tools.0: server tools",
        ),
        (
            {"model": "deepseek-chat", "max_tokens": 10, "messages": HI, "tool_choice": {"type": "tool"}},
            "tool_choice.name: Field required",
        ),
        (
            {
                "model": "deepseek-chat",
                "max_tokens": 10,
                "messages": [
                    {"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}
                ],
            },
            "messages.0.content.0: a tool_use block belongs in an assistant message",
        ),
        (
            {
                "model": "deepseek-chat",
                "max_tokens": 10,
                "messages": [
                    {"role": "user", "content": "Look"},
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
                    },
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "t", "content": [IMAGE]}],
                    },
                ],
            },
            "messages.2.content.0: the model 'deepseek-chat' does not take images",
        ),
        (
            {
                "model": "deepseek-chat",
                "max_tokens": 10,
                "messages": [*HI, {"role": "assistant", "content": "Sure,"}],
            },
            "messages.1: chatgate does not continue a final assistant message (prefill)",
        ),
    ],
)
async def test_bad_fields_are_400_naming_the_field_and_charge_nothing(
    client: Client, fake_deepseek: FakeUpstream, body: dict[str, Any], message: str
) -> None:
    response = await client.post(body)
    assert message in assert_anthropic_error(response, 400, "invalid_request_error")
    assert fake_deepseek.requests == []
    assert [e.kind for e in await client.ledger()] == ["topup"]


async def test_the_sdk_raises_bad_request_error(client: Client) -> None:
    with pytest.raises(anthropic.BadRequestError, match="max_tokens: Expected `int` >= 1") as caught:
        await client.sdk.messages.create(model="deepseek-chat", max_tokens=0, messages=HI)  # type: ignore[arg-type]
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    response = await client.post(b'{"model": "deepseek-chat", "messages": [')
    assert "not valid JSON" in assert_anthropic_error(response, 400, "invalid_request_error")
    response = await client.post(b"")
    assert "empty" in assert_anthropic_error(response, 400, "invalid_request_error")


async def test_a_body_nested_too_deeply_is_400_not_500(client: Client) -> None:
    """Deep nesting where any JSON is taken (a tool's schema): msgspec's RecursionError is a 400."""
    deep = b'{"model": "m", "max_tokens": 1, "messages": [], "tools": [{"name": "t", "input_schema": {"a": '
    response = await client.post(deep + b"[" * 50_000)
    assert "too deeply" in assert_anthropic_error(response, 400, "invalid_request_error")


async def test_a_prompt_past_the_context_is_400_prompt_too_long(client: Client) -> None:
    """The mock provider's mock-chat has a 4096-token context in the test configuration."""
    long = [{"role": "user", "content": "word " * 20_000}]
    with pytest.raises(anthropic.BadRequestError, match=r"prompt is too long: \d+ tokens > 4095 maximum"):
        await client.sdk.messages.create(model="mock-chat", max_tokens=10, messages=long)  # type: ignore[arg-type]
    assert [e.kind for e in await client.ledger()] == ["topup"]


async def test_a_store_failure_is_500_api_error_and_the_server_goes_on(
    client: Client, fake_deepseek: FakeUpstream, tmp_path: Path
) -> None:
    """The raw endpoint skips the router's exception handlers: it answers for itself."""
    db = sqlite3.connect(tmp_path / "chatgate.db")
    db.execute("ALTER TABLE ledger RENAME TO ledger_away")  # every reservation now fails
    db.commit()
    try:
        with pytest.raises(anthropic.InternalServerError) as caught:
            await client.sdk.messages.create(model="deepseek-chat", max_tokens=10, messages=HI)  # type: ignore[arg-type]
    finally:
        db.execute("ALTER TABLE ledger_away RENAME TO ledger")
        db.commit()
        db.close()
    assert caught.value.status_code == 500
    assert caught.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert fake_deepseek.requests == []
    assert (await client.sdk.messages.create(model="deepseek-chat", max_tokens=10, messages=HI)).content  # type: ignore[arg-type]


async def test_unknown_fields_are_ignored_not_sent_upstream(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    """Claude Code sends beta fields (context_management, output_config...): never a 400."""
    body = {
        "model": "deepseek-chat",
        "max_tokens": 10,
        "messages": HI,
        "context_management": {"edits": []},
        "output_config": {"effort": "high"},
        "service_tier": "auto",
    }
    response = await client.post(
        body, **{"anthropic-beta": "claude-code-20250219", "anthropic-version": "2099-01-01"}
    )
    assert response.status_code == 200
    sent = fake_deepseek.requests[-1].body
    assert not {"context_management", "output_config", "service_tier"} & set(sent)


async def test_keys_are_checked_401_authentication_error(client: Client) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=client.gateway.url, api_key="sk-cg-wrong", max_retries=0
    ) as sdk:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await sdk.messages.create(model="deepseek-chat", max_tokens=10, messages=HI)  # type: ignore[arg-type]
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    response = await client.gateway.client.post("/v1/messages", json={"model": "deepseek-chat"})
    assert "no API key" in assert_anthropic_error(response, 401, "authentication_error")
    # Bearer works as well as x-api-key (Claude Code's ANTHROPIC_AUTH_TOKEN).
    async with anthropic.AsyncAnthropic(
        base_url=client.gateway.url, auth_token=client.key, max_retries=0
    ) as sdk:
        message = await sdk.messages.create(model="deepseek-chat", max_tokens=10, messages=HI)  # type: ignore[arg-type]
    assert message.content


async def test_anthropic_base_url_in_the_environment_is_all_a_client_changes(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_BASE_URL", client.gateway.url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", client.key)
    async with anthropic.AsyncAnthropic(max_retries=0) as sdk:
        message = await sdk.messages.create(model="deepseek-chat", max_tokens=10, messages=HI)  # type: ignore[arg-type]
    assert message.content


async def test_an_unknown_model_is_404_not_found_error(client: Client, fake_deepseek: FakeUpstream) -> None:
    with pytest.raises(anthropic.NotFoundError, match="model: claude-9") as caught:
        await client.sdk.messages.create(model="claude-9", max_tokens=10, messages=HI)  # type: ignore[arg-type]
    assert caught.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert fake_deepseek.requests == []


async def test_an_exhausted_balance_is_402_billing_error_not_retried(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    await client.gateway.services.billing.top_up(client.user_id, -(await client.balance()))
    with pytest.raises(anthropic.APIStatusError) as caught:
        await client.sdk.messages.create(model="deepseek-chat", max_tokens=10, messages=HI)  # type: ignore[arg-type]
    assert caught.value.status_code == 402
    assert caught.value.body["error"]["type"] == "billing_error"  # type: ignore[index]
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert fake_deepseek.requests == []


async def test_a_key_at_its_limit_is_429_rate_limit_error_with_retry_after(client: Client) -> None:
    key = (await client.gateway.services.accounts.list_keys(client.user_id))[0]
    await client.gateway.services.accounts.set_limits(key.id, RateLimits(requests_per_minute=1))
    await client.sdk.messages.create(model="deepseek-chat", max_tokens=10, messages=HI)  # type: ignore[arg-type]
    with pytest.raises(anthropic.RateLimitError) as caught:
        await client.sdk.messages.create(model="deepseek-chat", max_tokens=10, messages=HI)  # type: ignore[arg-type]
    assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert len(await settled(client, 1)) == 1  # the refused one is not charged


async def test_an_instance_out_of_standing_is_503_overloaded_and_retryable(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    """Fail closed (core.cluster): a process that lost its standing admits nothing; the SDKs retry."""
    billing = client.gateway.services.billing
    billing.standing = lambda: "the store stopped answering"
    try:
        with pytest.raises(anthropic.APIStatusError) as caught:
            await client.sdk.messages.create(model="deepseek-chat", max_tokens=10, messages=HI)  # type: ignore[arg-type]
    finally:
        billing.standing = None
    assert caught.value.status_code == 503
    assert caught.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert caught.value.response.headers["retry-after"] == "1"
    assert fake_deepseek.requests == []


async def test_a_body_over_the_limit_is_413_request_too_large(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., Any]
) -> None:
    config = write_config(
        deepseek_config(fake_deepseek.url) + PRICED_MODELS + SURFACE,
        replace={'host = "127.0.0.1"\n': 'host = "127.0.0.1"\nmax_body_bytes = 2000\n'},
    )
    client = await start_client(gateway_factory, config)
    response = await client.post(
        {"model": "deepseek-chat", "max_tokens": 10, "messages": [{"role": "user", "content": "x" * 5000}]}
    )
    assert "2000" in assert_anthropic_error(response, 413, "request_too_large")
    with pytest.raises(anthropic.APIStatusError) as caught:
        await client.sdk.messages.create(
            model="deepseek-chat", max_tokens=10, messages=[{"role": "user", "content": "x" * 5000}]
        )
    assert caught.value.status_code == 413
    assert fake_deepseek.requests == []
    await client.sdk.close()


@pytest.mark.parametrize(
    ("scenario", "status", "type_", "error"),
    [
        (Scenario(status=503), 529, "overloaded_error", anthropic.OverloadedError),
        (Scenario(status=429, retry_after="3"), 429, "rate_limit_error", anthropic.RateLimitError),
        (Scenario(status=400, message="Bad thing"), 400, "invalid_request_error", anthropic.BadRequestError),
        (Scenario(status=401), 502, "api_error", anthropic.InternalServerError),
        (Scenario(status=402), 502, "api_error", anthropic.InternalServerError),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_refusal_before_the_reply_gets_a_real_status(
    client: Client,
    fake_deepseek: FakeUpstream,
    scenario: Scenario,
    status: int,
    type_: str,
    error: type[Exception],
    stream: bool,
) -> None:
    fake_deepseek.scenario = scenario

    async def ask() -> None:
        if stream:
            async with client.sdk.messages.stream(
                model="deepseek-chat", max_tokens=10, messages=HI
            ) as streamed:
                await streamed.get_final_message()
        else:
            await client.sdk.messages.create(model="deepseek-chat", max_tokens=10, messages=HI)  # type: ignore[arg-type]

    with pytest.raises(error) as caught:
        await ask()
    assert isinstance(caught.value, anthropic.APIStatusError)
    assert caught.value.status_code == status
    assert caught.value.body["error"]["type"] == type_  # type: ignore[index]
    # The operator's upstream key or balance: no retry can help (the SDKs retry a 502 otherwise).
    retry = caught.value.response.headers.get("x-should-retry")
    assert retry == ("false" if scenario.status in (401, 402) else None)
    (charge,) = await settled(client, 1)
    assert (charge.outcome, charge.amount) == ("error", 0)


async def test_a_failure_mid_stream_is_an_error_event_the_sdk_raises(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(tokens=40, disconnect_after=5)
    seen: list[str] = []

    async def read() -> None:
        async with client.sdk.messages.stream(model="deepseek-chat", max_tokens=300, messages=HI) as streamed:
            async for text in streamed.text_stream:
                seen.append(text)

    with pytest.raises(anthropic.APIStatusError) as caught:
        await read()
    assert seen, "the reply had begun"
    assert caught.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    (charge,) = await settled(client, 1)
    assert charge.outcome == "error"
    assert charge.completion_tokens > 0  # what was streamed is charged, once


def retrying(client: Client) -> anthropic.AsyncAnthropic:
    """The SDK as people run it: it retries what it may, twice (its default)."""
    return anthropic.AsyncAnthropic(base_url=client.gateway.url, api_key=client.key, max_retries=2)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_reply_cut_for_want_of_upstream_resources_is_a_paid_success(
    client: Client, fake_deepseek: FakeUpstream, stream: bool
) -> None:
    """DeepSeek's `insufficient_system_resource`: the reply so far is charged, so the client gets it
    (200, end_turn), never a 529 or an overloaded_error the SDK retries and is charged for again."""
    fake_deepseek.scenario = Scenario(
        finish_reason="insufficient_system_resource", content="A partial answer"
    )
    async with retrying(client) as sdk:
        if stream:
            async with sdk.messages.stream(model="deepseek-chat", max_tokens=100, messages=HI) as streamed:
                message = await streamed.get_final_message()
        else:
            message = await sdk.messages.create(model="deepseek-chat", max_tokens=100, messages=HI)  # type: ignore[arg-type]
    assert [b.text for b in message.content if b.type == "text"] == ["A partial answer"]
    assert message.stop_reason == "end_turn"
    assert len(fake_deepseek.requests) == 1
    charges = await settled(client, 1)
    assert [(c.outcome, c.completion_tokens) for c in charges] == [("complete", message.usage.output_tokens)]


async def test_a_whole_reply_that_failed_after_it_began_is_charged_once_and_not_retried(
    write_config: Callable[..., Path], gateway_factory: Callable[..., Any]
) -> None:
    """Core charges a failed reply what it produced; the SDK would retry the 529 and pay again, so
    the answer says x-should-retry: false (one before anything was produced stays retryable: see
    test_an_upstream_refusal_before_the_reply_gets_a_real_status)."""
    fail = {"token_delay = 0\nmodels": 'token_delay = 0\nfail = "unavailable"\nfail_after_tokens = 3\nmodels'}
    client = await start_client(gateway_factory, write_config(SURFACE, replace=fail))
    async with retrying(client) as sdk:
        with pytest.raises(anthropic.APIStatusError) as caught:
            await sdk.messages.create(model="mock-chat", max_tokens=100, messages=HI)  # type: ignore[arg-type]
    assert caught.value.status_code == 529
    assert caught.value.response.headers["x-should-retry"] == "false"
    charges = await settled(client, 1)
    assert [c.outcome for c in charges] == ["error"]  # one request, charged once
    assert charges[0].completion_tokens > 0
    await client.sdk.close()


async def test_another_method_is_405_and_another_path_404_in_anthropic_shape(client: Client) -> None:
    response = await client.gateway.client.get("/v1/messages", headers={"x-api-key": client.key})
    assert "GET" in assert_anthropic_error(response, 405, "invalid_request_error")
    assert response.headers["allow"] == "OPTIONS, POST"
    assert (await client.gateway.client.options("/v1/messages")).status_code == 204
    response = await client.gateway.client.get("/v1/messages/batches/x", headers={"x-api-key": client.key})
    assert "/v1/messages/batches/x" in assert_anthropic_error(response, 404, "not_found_error")
    schema = (await client.gateway.client.get("/schema/openapi.json")).json()
    assert {"/v1/messages", "/v1/messages/count_tokens"} <= set(schema["paths"])


# --- money ---


async def test_each_request_is_charged_exactly_once_at_the_model_prices(client: Client) -> None:
    before = await client.balance()
    message = await client.sdk.messages.create(model="deepseek-chat", max_tokens=100, messages=HI)  # type: ignore[arg-type]
    async with client.sdk.messages.stream(model="deepseek-chat", max_tokens=100, messages=HI) as streamed:
        final = await streamed.get_final_message()
    charges = await settled(client, 2)
    assert len(charges) == 2
    for charge, reply in zip(charges, [message, final], strict=True):
        assert charge.outcome == "complete"
        assert charge.model == "deepseek-chat"
        assert charge.key_id is not None
        assert charge.prompt_tokens == reply.usage.input_tokens + (reply.usage.cache_read_input_tokens or 0)
        assert charge.completion_tokens == reply.usage.output_tokens
        assert charge.amount == -(charge.prompt_tokens * 1000 + charge.completion_tokens * 2000)
    assert await client.balance() == before + sum(c.amount for c in charges)


async def test_a_client_that_leaves_mid_stream_cancels_upstream_and_pays_for_what_it_got(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(tokens=200, token_delay=0.05)
    body = {"model": "deepseek-chat", "max_tokens": 1000, "messages": HI, "stream": True}
    async with (
        httpx.AsyncClient(base_url=client.gateway.url) as http,
        http.stream("POST", "/v1/messages", json=body, headers={"x-api-key": client.key}) as response,
    ):
        received = 0
        async for line in response.aiter_lines():
            received += line.startswith("event: content_block_delta")
            if received >= 3:
                break
    # The whole reply takes the upstream 10 s: a close it sees within a generous 5 s is the
    # cancellation's (a reply that ran to its end would leave the connection open, kept alive).
    await fake_deepseek.wait_for_disconnect(timeout=5)
    (charge,) = await settled(client, 1)
    assert charge.outcome == "cancelled"
    assert 0 < charge.completion_tokens < 200


# --- paths, pings, count_tokens, models ---


async def test_beta_true_and_a_trailing_slash_reach_the_same_endpoint(client: Client) -> None:
    """Research finding 3, E #9: Claude Code calls /v1/messages?beta=true; the query plays no part."""
    body = {"model": "deepseek-chat", "max_tokens": 10, "messages": HI}
    for path in (
        "/v1/messages?beta=true",
        "/v1/messages/",
        "/v1/messages/count_tokens?beta=true",
        "/v1/messages/count_tokens/",
    ):
        response = await client.post(body, path)
        assert response.status_code == 200, (path, response.text)
    message = await client.sdk.beta.messages.create(model="deepseek-chat", max_tokens=10, messages=HI)  # type: ignore[arg-type]
    assert message.content
    count = await client.sdk.beta.messages.count_tokens(model="deepseek-chat", messages=HI)  # type: ignore[arg-type]
    assert count.input_tokens > 0


async def test_a_slow_first_token_gets_ping_events(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., Any]
) -> None:
    config = write_config(
        deepseek_config(fake_deepseek.url) + PRICED_MODELS + SURFACE + "keepalive_interval = 0.1\n"
    )
    client = await start_client(gateway_factory, config)
    fake_deepseek.scenario = Scenario(first_token_delay=0.5, content="Finally.")
    response = await client.post({"model": "deepseek-chat", "max_tokens": 10, "messages": HI, "stream": True})
    names = [name for name, _ in sse(response.text)]
    assert names[0] == "message_start"
    assert names.count("ping") >= 2
    async with client.sdk.messages.stream(model="deepseek-chat", max_tokens=10, messages=HI) as streamed:
        assert "".join([t async for t in streamed.text_stream]) == "Finally."
    await client.sdk.close()


async def test_count_tokens_estimates_the_whole_request_and_charges_nothing(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    small = await client.sdk.messages.count_tokens(model="deepseek-chat", messages=HI)  # type: ignore[arg-type]
    large = await client.sdk.messages.count_tokens(
        model="deepseek-chat",
        messages=HI,
        system="You are a careful assistant.",
        tools=[WEATHER],  # type: ignore[arg-type]
    )
    assert 0 < small.input_tokens < large.input_tokens
    assert fake_deepseek.requests == []
    assert [e.kind for e in await client.ledger()] == ["topup"]
    response = await client.post({"model": "deepseek-chat", "messages": "hi"}, "/v1/messages/count_tokens")
    assert "messages" in assert_anthropic_error(response, 400, "invalid_request_error")
    with pytest.raises(anthropic.NotFoundError):
        await client.sdk.messages.count_tokens(model="nope", messages=HI)  # type: ignore[arg-type]
    response = await client.gateway.client.post(
        "/v1/messages/count_tokens", json={"model": "deepseek-chat", "messages": HI}
    )
    assert_anthropic_error(response, 401, "authentication_error")


async def test_models_answer_both_sdks(client: Client) -> None:
    """Research A.13, E #9: one body that the anthropic and the openai SDK both read."""
    listed = [m async for m in client.sdk.models.list()]
    assert {"deepseek-chat", "deepseek-v4-flash"} <= {m.id for m in listed}
    assert all(m.type == "model" and m.display_name and m.created_at.year == 2025 for m in listed)
    one = await client.sdk.models.retrieve("deepseek-chat")
    assert one.id == "deepseek-chat"
    with pytest.raises(anthropic.NotFoundError):
        await client.sdk.models.retrieve("nope")
    async with openai.AsyncOpenAI(
        base_url=client.gateway.url + "/v1", api_key=client.key, max_retries=0
    ) as sdk:
        assert [m.id for m in (await sdk.models.list()).data] == [m.id for m in listed]


async def test_without_the_openai_surface_this_one_serves_models(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., Any]
) -> None:
    config = write_config(
        deepseek_config(fake_deepseek.url) + PRICED_MODELS + SURFACE,
        replace={"[surfaces.openai_compat]\n": "[surfaces.openai_compat]\nenabled = false\n"},
    )
    client = await start_client(gateway_factory, config)
    listed = [m.id async for m in client.sdk.models.list()]
    assert listed == list(client.gateway.services.catalog.models)
    assert (await client.sdk.models.retrieve("deepseek-chat")).display_name == "deepseek-chat"
    with pytest.raises(anthropic.NotFoundError):
        await client.sdk.models.retrieve("nope")
    response = await client.gateway.client.get("/v1/models")
    assert_anthropic_error(response, 401, "authentication_error")
    async with openai.AsyncOpenAI(
        base_url=client.gateway.url + "/v1", api_key=client.key, max_retries=0
    ) as sdk:
        assert [m.id for m in (await sdk.models.list()).data] == listed
    assert (
        await client.post({"model": "deepseek-chat", "max_tokens": 10, "messages": HI})
    ).status_code == 200
    await client.sdk.close()


# --- images ---


async def test_an_image_for_a_model_without_vision_is_400_naming_the_block(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    body = {
        "model": "deepseek-chat",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "What?"}, IMAGE]}],
    }
    message = assert_anthropic_error(await client.post(body), 400, "invalid_request_error")
    assert message.startswith("messages.0.content.1:")
    assert "vision" in message
    assert fake_deepseek.requests == []
    assert [e.kind for e in await client.ledger()] == ["topup"]


async def test_a_model_with_vision_gets_images_as_image_url_parts(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., Any]
) -> None:
    models = PRICED_MODELS.replace(
        "max_output_tokens = 4096\n", "max_output_tokens = 4096\nvision = true\n", 1
    )
    client = await start_client(
        gateway_factory, write_config(deepseek_config(fake_deepseek.url) + models + SURFACE)
    )
    url_image = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    content = [{"type": "text", "text": "Compare"}, IMAGE, url_image]
    await client.sdk.messages.create(
        model="deepseek-chat", max_tokens=10, messages=[{"role": "user", "content": content}]
    )  # type: ignore[arg-type]
    assert upstream_messages(fake_deepseek)[0]["content"] == [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
    ]
    await client.sdk.close()


# --- node ---


def node_available() -> bool:
    return shutil.which("node") is not None and (NODE / "node_modules" / "@anthropic-ai" / "sdk").is_dir()


async def test_the_node_sdk_creates_and_streams(client: Client, fake_deepseek: FakeUpstream) -> None:
    if not node_available():
        if os.environ.get("CHATGATE_REQUIRE_NODE"):
            pytest.fail("CHATGATE_REQUIRE_NODE is set but node or tests/node/node_modules is missing")
        pytest.skip("node or tests/node/node_modules (npm ci --prefix tests/node) is missing")
    fake_deepseek.scenario = Scenario(reasoning="Hmm.", content="Hello, node.")
    env = {
        **os.environ,
        "ANTHROPIC_BASE_URL": client.gateway.url,
        "ANTHROPIC_API_KEY": client.key,
        "MODEL": "deepseek-v4-flash",
    }
    env.pop("ANTHROPIC_AUTH_TOKEN", None)
    process = await asyncio.create_subprocess_exec(
        "node",
        "anthropic_messages.mjs",
        cwd=NODE,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    for message in (result["whole"], result["final"]):
        assert [b["type"] for b in message["content"]] == ["thinking", "text"]
        assert message["content"][1]["text"] == "Hello, node."
        assert message["stop_reason"] == "end_turn"
        assert message["usage"]["output_tokens"] > 0
    assert result["streamed"] == "Hello, node."
    assert result["notFound"] == {"name": "NotFoundError", "status": 404, "type": "not_found_error"}
    assert "deepseek-v4-flash" in result["models"]
    assert len(await settled(client, 2)) == 2
