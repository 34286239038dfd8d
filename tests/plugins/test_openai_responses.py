"""POST/GET/DELETE /v1/responses, driven by the official openai SDK, LangChain and raw HTTP against a
live gateway, with the fake DeepSeek upstream (or a scripted provider) behind it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import httpx
import openai
import pytest

from core import (
    ChatRequest,
    ContentDelta,
    Finish,
    LedgerEntry,
    ProviderEvent,
    ReasoningDelta,
    ToolCallDelta,
    Usage,
    hookimpl,
)
from core.testing.fake_upstream import FakeUpstream, Scenario, ToolCallSpec
from providers.mock import MockProvider
from tests.conftest import PRICED_MODELS, RunningGateway, charges_settled, deepseek_config, funded_key

NODE = Path(__file__).parents[1] / "node"
WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}


class Client:
    """A gateway with a funded key, and the official SDK pointed at it."""

    def __init__(self, gateway: RunningGateway, key: str, user_id: int) -> None:
        self.gateway = gateway
        self.key = key
        self.user_id = user_id
        self.sdk = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)

    async def post(self, body: Any, key: str | None = None) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {key or self.key}", "Content-Type": "application/json"}
        return await self.gateway.client.post("/v1/responses", content=content, headers=headers)

    async def ledger(self) -> list[LedgerEntry]:
        return await self.gateway.services.billing.store.list_ledger(self.user_id)


@pytest.fixture
async def client(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., object]
) -> AsyncIterator[Client]:
    config = write_config(deepseek_config(fake_deepseek.url, extra="max_retries = 0") + PRICED_MODELS)
    gateway: RunningGateway = await gateway_factory(config)  # type: ignore[assignment,misc]
    client = Client(gateway, *await funded_key(gateway))
    yield client
    await client.sdk.close()


async def settled(client: Client, count: int) -> list[LedgerEntry]:
    """The charges once ``count`` requests have settled."""
    return await charges_settled(client.gateway, client.user_id, count)


async def nothing_kept(client: Client) -> None:
    """Wait until the client's user has no stored response (an unanswered one's conversation goes
    just after its answer)."""
    async with asyncio.timeout(5):  # a bound for a stuck discard, not a timing expectation
        while True:
            if not await client.gateway.services.conversations.list(client.user_id, "response"):
                return
            await asyncio.sleep(0.01)


def sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """A Responses stream as (event name, data) pairs; comments skipped."""
    out = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        assert lines[0].startswith("event: "), block
        assert lines[1].startswith("data: "), block
        out.append((lines[0].removeprefix("event: "), json.loads(lines[1].removeprefix("data: "))))
    return out


# --- create, whole and streamed ---


async def test_text_input_with_instructions(client: Client, fake_deepseek: FakeUpstream) -> None:
    fake_deepseek.scenario = Scenario(content="Hello from DeepSeek.")
    response = await client.sdk.responses.create(
        model="deepseek-chat", input="Hi", instructions="Be terse.", temperature=0.5
    )
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status == "completed"
    assert response.output_text == "Hello from DeepSeek."
    assert response.instructions == "Be terse."
    assert response.error is None
    assert response.usage is not None
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens > 0
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    body = fake_deepseek.requests[-1].body
    assert body["messages"] == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    assert body["temperature"] == 0.5


async def test_item_input(client: Client, fake_deepseek: FakeUpstream) -> None:
    await client.sdk.responses.create(
        model="deepseek-chat",
        input=[
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Rhyme."}]},
            {"role": "user", "content": "knock knock."},
            {"role": "assistant", "content": "Who's there?"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Orange."}]},
        ],
    )
    assert fake_deepseek.requests[-1].body["messages"] == [
        {"role": "system", "content": "Rhyme."},
        {"role": "user", "content": "knock knock."},
        {"role": "assistant", "content": "Who's there?"},
        {"role": "user", "content": "Orange."},
    ]


async def test_sdk_stream_with_reasoning(client: Client, fake_deepseek: FakeUpstream) -> None:
    fake_deepseek.scenario = Scenario(reasoning="Think it over.", content="Streamed answer.")
    async with client.sdk.responses.stream(model="deepseek-reasoner", input="Hi") as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Streamed answer."
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Think it over."
    assert final.output_text == "Streamed answer."
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == "Think it over."  # type: ignore[union-attr,index]
    assert final.usage is not None
    assert final.usage.output_tokens_details.reasoning_tokens > 0
    assert final.id.startswith("resp_")


async def test_a_reasoning_summary_streams_as_summary_events(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(reasoning="Think it over.", content="Done.")
    async with client.sdk.responses.stream(
        model="deepseek-reasoner", input="Hi", reasoning={"summary": "auto"}
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[2:4] == ["response.output_item.added", "response.reasoning_summary_part.added"]
    assert "response.reasoning_text.delta" not in kinds
    summary = "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta")
    assert summary == "Think it over."
    done = next(e for e in events if e.type == "response.reasoning_summary_text.done")
    assert done.text == "Think it over."
    reasoning = final.output[0]
    assert reasoning.type == "reasoning"
    assert [s.text for s in reasoning.summary] == ["Think it over."]
    assert final.output_text == "Done."


async def test_raw_stream_framing(client: Client, fake_deepseek: FakeUpstream) -> None:
    """event: lines and type in data, sequence numbers from 0, items in order, no [DONE] (dialects E.10)."""
    fake_deepseek.scenario = Scenario(content="Hello, World!")
    answer = await client.post({"model": "deepseek-chat", "input": "Hi", "stream": True})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in answer.text
    events = sse(answer.text)
    assert all(name == data["type"] for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * (len(events) - 8),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    created = events[0][1]["response"]
    assert created["status"] == "in_progress"
    assert created["output"] == []
    assert created["usage"] is None
    assert all(d["logprobs"] == [] for n, d in events if n == "response.output_text.delta")
    done = events[-1][1]["response"]
    assert done["id"] == created["id"]
    assert done["output"][0]["content"][0]["text"] == "Hello, World!"


async def test_a_function_tool_round_trip_with_previous_response_id(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    """Thinking mode with a tool call: the reasoning goes back with the call (DeepSeek refuses the
    follow-up otherwise; dialects.md E.6), the output pairs with the call by call_id (E.7)."""
    fake_deepseek.scenario = Scenario(
        reasoning="Look it up.", tool_call=ToolCallSpec(name="get_weather", arguments='{"city": "Paris"}')
    )
    first = await client.sdk.responses.create(
        model="deepseek-reasoner", input="Weather in Paris?", tools=[WEATHER]
    )
    assert first.status == "completed"
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Paris"}')
    assert call.call_id
    assert call.id
    assert call.id.startswith("fc_")
    assert fake_deepseek.requests[-1].body["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    ]
    fake_deepseek.scenario = Scenario(reasoning="Sunny it is.", content="It is sunny in Paris.")
    second = await client.sdk.responses.create(
        model="deepseek-reasoner",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 C"}],
        tools=[WEATHER],
    )
    assert second.output_text == "It is sunny in Paris."
    assert second.previous_response_id == first.id
    messages = fake_deepseek.requests[-1].body["messages"]
    assert messages == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call.call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
            "reasoning_content": "Look it up.",
        },
        {"role": "tool", "content": "Sunny, 24 C", "tool_call_id": call.call_id},
    ]


async def test_a_streamed_tool_call(client: Client, fake_deepseek: FakeUpstream) -> None:
    arguments = '{"city": "Paris"}'
    fake_deepseek.scenario = Scenario(tool_call=ToolCallSpec(name="get_weather", arguments=arguments))
    async with client.sdk.responses.stream(
        model="deepseek-chat", input="Weather?", tools=[WEATHER]
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.type == "function_call"
    assert added.item.name == "get_weather"
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == arguments
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert (done.name, done.arguments) == ("get_weather", arguments)
    (call,) = final.output
    assert call.type == "function_call"
    assert call.arguments == arguments
    assert call.status == "completed"


async def test_previous_response_id_context_reaches_the_upstream(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    """Each turn's input and output, oldest first; the earlier instructions are not carried over."""
    fake_deepseek.scenario = Scenario(content="Nice to meet you, Ada.")
    first = await client.sdk.responses.create(model="deepseek-chat", input="I am Ada.", instructions="Old.")
    fake_deepseek.scenario = Scenario(content="Noted.")
    second = await client.sdk.responses.create(
        model="deepseek-chat",
        input=[{"role": "user", "content": "I like tea."}],
        previous_response_id=first.id,
    )
    fake_deepseek.scenario = Scenario(content="You are Ada.")
    async with client.sdk.responses.stream(
        model="deepseek-chat", input="Who am I?", previous_response_id=second.id, instructions="New."
    ) as stream:
        final = await stream.get_final_response()
    assert final.output_text == "You are Ada."
    assert fake_deepseek.requests[-1].body["messages"] == [
        {"role": "system", "content": "New."},
        {"role": "user", "content": "I am Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "user", "content": "I like tea."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Who am I?"},
    ]
    # The streamed response is stored too: the chain goes on from it.
    fake_deepseek.scenario = Scenario(content="Tea.")
    fourth = await client.sdk.responses.create(
        model="deepseek-chat", input="And?", previous_response_id=final.id
    )
    assert fourth.output_text == "Tea."
    assert len(fake_deepseek.requests[-1].body["messages"]) == 7


# --- storage ---


async def test_store_false_keeps_nothing(client: Client) -> None:
    response = await client.sdk.responses.create(model="deepseek-chat", input="Hi", store=False)
    assert response.store is False
    assert response.id.startswith("resp_")
    with pytest.raises(openai.NotFoundError):
        await client.sdk.responses.retrieve(response.id)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.sdk.responses.create(model="deepseek-chat", input="Hi", previous_response_id=response.id)
    assert caught.value.code == "previous_response_not_found"
    conversations = await client.gateway.services.conversations.list(client.user_id, "response")
    assert conversations == []


@pytest.mark.parametrize("unknown", ["resp_0f09a275409", "resp_" + "0" * 24 + "ffff", "chatcmpl-1"])
async def test_an_unknown_previous_response_id_is_400_and_charges_nothing(
    client: Client, fake_deepseek: FakeUpstream, unknown: str
) -> None:
    answer = await client.post({"model": "deepseek-chat", "input": "Hi", "previous_response_id": unknown})
    assert answer.status_code == 400
    assert answer.json() == {
        "error": {
            "message": f"Previous response with id '{unknown}' not found.",
            "type": "invalid_request_error",
            "param": "previous_response_id",
            "code": "previous_response_not_found",
        }
    }
    assert fake_deepseek.requests == []
    assert [e for e in await client.ledger() if e.kind != "topup"] == []


async def test_get_delete_and_input_items(client: Client, fake_deepseek: FakeUpstream) -> None:
    fake_deepseek.scenario = Scenario(content="Answer.")
    created = await client.sdk.responses.create(
        model="deepseek-chat",
        instructions="Be kind.",
        input=[
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "three"}]},
        ],
    )
    got = await client.sdk.responses.retrieve(created.id)
    assert got.model_dump() == created.model_dump()
    assert got.instructions == "Be kind."
    items = [item async for item in client.sdk.responses.input_items.list(created.id, limit=2)]  # pages of 2
    assert [item.content[0].text for item in items] == ["three", "two", "one"]  # type: ignore[union-attr]
    assert all(item.id for item in items)
    ascending = await client.sdk.responses.input_items.list(created.id, order="asc", limit=2)
    assert [item.content[0].text for item in ascending.data] == ["one", "two"]  # type: ignore[union-attr]
    assert ascending.has_more is True
    assert ascending.first_id == items[2].id
    assert ascending.last_id == items[1].id
    deleted = await client.gateway.client.delete(
        f"/v1/responses/{created.id}", headers={"Authorization": f"Bearer {client.key}"}
    )
    assert deleted.status_code == 200
    assert deleted.json() == {"id": created.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError) as caught:
        await client.sdk.responses.retrieve(created.id)
    assert caught.value.body == {  # type: ignore[comparison-overlap]
        "message": f"Response with id '{created.id}' not found.",
        "type": "invalid_request_error",
        "param": "response_id",
        "code": None,
    }
    with pytest.raises(openai.NotFoundError):
        await client.sdk.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.sdk.responses.input_items.list(created.id)
    with pytest.raises(openai.BadRequestError):
        await client.sdk.responses.create(model="deepseek-chat", input="Hi", previous_response_id=created.id)


async def test_another_users_response_is_not_found(client: Client, fake_deepseek: FakeUpstream) -> None:
    mine = await client.sdk.responses.create(model="deepseek-chat", input="A secret.")
    key, secret = await client.gateway.services.accounts.create_key("other@example.com")
    await client.gateway.services.billing.top_up(key.user_id, 100_000_000)
    async with openai.AsyncOpenAI(
        base_url=client.gateway.url + "/v1", api_key=secret, max_retries=0
    ) as other:
        with pytest.raises(openai.NotFoundError) as caught:
            await other.responses.retrieve(mine.id)
        assert "A secret" not in str(caught.value.body)
        with pytest.raises(openai.NotFoundError):
            await other.responses.input_items.list(mine.id)
        with pytest.raises(openai.NotFoundError):
            await other.responses.delete(mine.id)
        with pytest.raises(openai.BadRequestError) as refused:
            await other.responses.create(model="deepseek-chat", input="Hi", previous_response_id=mine.id)
        assert refused.value.code == "previous_response_not_found"
    assert (await client.sdk.responses.retrieve(mine.id)).id == mine.id  # still there for its owner


async def test_a_chain_is_bounded_and_needs_every_link(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from plugins.openai_compat.responses_api import saved

    monkeypatch.setattr(saved, "MAX_CHAIN", 2)  # the bound is 4096; two links show it as well
    first = await client.sdk.responses.create(model="deepseek-chat", input="One.")
    second = await client.sdk.responses.create(
        model="deepseek-chat", input="Two.", previous_response_id=first.id
    )
    answer = await client.post(
        {"model": "deepseek-chat", "input": "Three.", "previous_response_id": second.id}
    )
    assert answer.status_code == 200
    answer = await client.post(
        {"model": "deepseek-chat", "input": "Four.", "previous_response_id": answer.json()["id"]}
    )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == ("previous_response_chain_too_long", "previous_response_id")
    # A deleted link breaks the chain after it, naming the missing response.
    await client.sdk.responses.delete(first.id)
    answer = await client.post(
        {"model": "deepseek-chat", "input": "Three.", "previous_response_id": second.id}
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == f"Previous response with id '{first.id}' not found."


async def test_a_response_id_is_not_the_bare_conversation_id(client: Client) -> None:
    """Ids carry a nonce: the same conversation id with another nonce is not found."""
    response = await client.sdk.responses.create(model="deepseek-chat", input="Hi")
    forged = "resp_" + "0" * 24 + response.id[5 + 24 :]
    with pytest.raises(openai.NotFoundError):
        await client.sdk.responses.retrieve(forged)


# --- translation ---


@pytest.mark.parametrize("stream", [False, True])
async def test_max_output_tokens_ends_incomplete(
    client: Client, fake_deepseek: FakeUpstream, stream: bool
) -> None:
    fake_deepseek.scenario = Scenario(tokens=24)
    body = {"model": "deepseek-chat", "input": "Tell me a story", "max_output_tokens": 3, "stream": stream}
    answer = await client.post(body)
    assert answer.status_code == 200
    if stream:
        events = sse(answer.text)
        assert events[-1][0] == "response.incomplete"
        response = events[-1][1]["response"]
    else:
        response = answer.json()
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["max_output_tokens"] == 3
    assert response["output"][0]["status"] == "incomplete"
    assert fake_deepseek.requests[-1].body["max_tokens"] == 3
    async with client.sdk.responses.stream(
        model="deepseek-chat", input="More", max_output_tokens=3
    ) as sdk_stream:
        kinds = [event.type async for event in sdk_stream]
    assert kinds[-1] == "response.incomplete"


async def test_text_format_json_schema_reaches_the_upstream(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(content='{"name": "Ada"}')
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    response = await client.sdk.responses.create(
        model="deepseek-chat",
        input="Who?",
        text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}},
    )
    assert json.loads(response.output_text) == {"name": "Ada"}
    assert fake_deepseek.requests[-1].body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": schema, "strict": True},
    }
    assert response.text is not None
    assert response.text.format.type == "json_schema"
    await client.sdk.responses.create(
        model="deepseek-chat", input="Who?", text={"format": {"type": "json_object"}}
    )
    assert fake_deepseek.requests[-1].body["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize(
    ("effort", "sent"),
    [
        ("none", {"thinking": {"type": "disabled"}}),
        ("minimal", {"thinking": {"type": "disabled"}}),
        ("low", {"thinking": {"type": "enabled"}, "reasoning_effort": "high"}),
        ("xhigh", {"thinking": {"type": "enabled"}, "reasoning_effort": "max"}),
    ],
)
async def test_reasoning_effort_in_deepseeks_terms(
    fake_deepseek: FakeUpstream,
    write_config: Callable[..., Path],
    gateway_factory: Callable[..., Any],
    effort: str,
    sent: dict[str, Any],
) -> None:
    """A model without an alias's extra_body: the effort decides thinking (an alias would win)."""
    config = write_config(
        deepseek_config(fake_deepseek.url) + '\n[models.deepseek-v4-flash]\nprovider = "deepseek"\n'
    )
    gateway: RunningGateway = await gateway_factory(config)
    _key, secret = await gateway.services.accounts.create_key("effort@example.com")
    async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=secret, max_retries=0) as sdk:
        await sdk.responses.create(model="deepseek-v4-flash", input="Hi", reasoning={"effort": effort})  # type: ignore[typeddict-item]
    body = fake_deepseek.requests[-1].body
    assert {k: body.get(k) for k in sent} == sent
    if "reasoning_effort" not in sent:
        assert "reasoning_effort" not in body


# --- money ---


async def test_each_request_is_charged_once_at_the_model_prices(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    whole = await client.sdk.responses.create(model="deepseek-chat", input="Hi")
    async with client.sdk.responses.stream(model="deepseek-chat", input="Hi") as stream:
        streamed = await stream.get_final_response()
    charges = await settled(client, 2)
    assert len(charges) == 2
    for response, charge in zip([streamed, whole], charges, strict=True):  # newest first
        assert response.usage is not None
        assert (charge.prompt_tokens, charge.completion_tokens) == (
            response.usage.input_tokens,
            response.usage.output_tokens,
        )
        assert charge.amount == -(response.usage.input_tokens * 1000 + response.usage.output_tokens * 2000)
        assert charge.outcome == "complete"
    # Both were stored before they were answered, and storing them charged nothing more.
    for response in (whole, streamed):
        assert (await client.sdk.responses.retrieve(response.id)).id == response.id
    assert len([e for e in await client.ledger() if e.kind == "charge"]) == 2


async def test_an_exhausted_balance_is_403(client: Client, fake_deepseek: FakeUpstream) -> None:
    user = await client.gateway.services.accounts.get_user(client.user_id)
    await client.gateway.services.billing.top_up(client.user_id, -user.balance)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await client.sdk.responses.create(model="deepseek-chat", input="Hi")
    assert caught.value.code == "insufficient_user_quota"
    assert caught.value.body["type"] == "insufficient_quota"  # type: ignore[index]
    assert fake_deepseek.requests == []
    assert await client.gateway.services.conversations.list(client.user_id, "response") == []


async def test_an_unknown_model_is_404_model_not_found(client: Client) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.sdk.responses.create(model="gpt-nope", input="Hi")
    assert caught.value.code == "model_not_found"
    assert caught.value.body["param"] == "model"  # type: ignore[index]


async def test_a_bad_key_is_401(client: Client) -> None:
    async with openai.AsyncOpenAI(
        base_url=client.gateway.url + "/v1", api_key="sk-wrong", max_retries=0
    ) as sdk:
        with pytest.raises(openai.AuthenticationError) as caught:
            await sdk.responses.create(model="deepseek-chat", input="Hi")
        assert caught.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await sdk.responses.retrieve("resp_x")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "deepseek-chat"}, "input"),
        ({"model": "deepseek-chat", "input": 5}, "input"),
        ({"model": "deepseek-chat", "input": []}, "input"),
        ({"input": "Hi"}, "model"),
        ({"model": "deepseek-chat", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"model": "deepseek-chat", "input": [{"role": "user", "content": 5}]}, "input[0].content"),
        (
            {"model": "deepseek-chat", "input": [{"role": "user", "content": [{"type": "input_file"}]}]},
            "input[0].content[0].type",
        ),
        (
            {"model": "deepseek-chat", "input": [{"type": "function_call_output", "output": "x"}]},
            "input[0].call_id",
        ),
        ({"model": "deepseek-chat", "input": [{"type": "web_search_call"}]}, "input[0].type"),
        ({"model": "deepseek-chat", "input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"model": "deepseek-chat", "input": "Hi", "tools": [{"type": "function"}]}, "tools[0].name"),
        ({"model": "deepseek-chat", "input": "Hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "deepseek-chat", "input": "Hi", "temperature": 3}, "temperature"),
        ({"model": "deepseek-chat", "input": "Hi", "stream": "yes"}, "stream"),
        ({"model": "deepseek-chat", "input": "Hi", "store": 1}, "store"),
        (
            {"model": "deepseek-chat", "input": "Hi", "text": {"format": {"type": "json_schema"}}},
            "text.format.name",
        ),
        (
            {
                "model": "deepseek-chat",
                "input": "Hi",
                "text": {"format": {"type": "json_schema", "name": "x"}},
            },
            "text.format.schema",
        ),
        ({"model": "deepseek-chat", "input": "Hi", "reasoning": {"effort": "huge"}}, "reasoning.effort"),
        ({"model": "deepseek-chat", "input": "Hi", "background": True}, "background"),
        ({"model": "deepseek-chat", "input": "Hi", "conversation": "conv_1"}, "conversation"),
        ({"model": "deepseek-chat", "input": "Hi", "tool_choice": 7}, "tool_choice"),
        ({"model": "deepseek-chat", "input": "Hi", "previous_response_id": 7}, "previous_response_id"),
        # Hostile shapes where a string is checked against a set: a list or an object is no member.
        (
            {"model": "deepseek-chat", "input": [{"role": "user", "content": [{"type": ["input_text"]}]}]},
            "input[0].content[0].type",
        ),
        (
            {"model": "deepseek-chat", "input": [{"role": "user", "content": [{"type": {"a": 1}}]}]},
            "input[0].content[0].type",
        ),
        ({"model": "deepseek-chat", "input": [{"type": ["message"], "role": "user"}]}, "input[0].type"),
        *(
            (
                {
                    "model": "deepseek-chat",
                    "input": "Hi",
                    "tools": [WEATHER],
                    "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": [tool]},
                },
                param,
            )
            for tool, param in (
                ({"type": "function", "name": ["get_weather"]}, "tool_choice.tools[0].name"),
                ({"type": "function", "name": {"n": 1}}, "tool_choice.tools[0].name"),
                ("get_weather", "tool_choice.tools[0]"),
            )
        ),
        (
            {
                "model": "deepseek-chat",
                "input": "Hi",
                "tools": [WEATHER],
                "tool_choice": {"type": "allowed_tools", "mode": ["required"], "tools": []},
            },
            "tool_choice.mode",
        ),
        ({"model": "gpt-nope", "input": 5}, "input"),  # a bad field is named before the model is refused
    ],
)
async def test_bad_fields_answer_400_naming_the_param_and_charge_nothing(
    client: Client, fake_deepseek: FakeUpstream, body: dict[str, Any], param: str
) -> None:
    answer = await client.post(body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert param.split(".")[0].split("[")[0] in error["message"]
    assert fake_deepseek.requests == []
    assert [e for e in await client.ledger() if e.kind != "topup"] == []


async def test_an_image_for_a_model_without_vision_is_400_naming_the_part(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    image = {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}
    content = [{"type": "input_text", "text": "What is this?"}, image]
    answer = await client.post({"model": "deepseek-chat", "input": [{"role": "user", "content": content}]})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == ("image_not_supported", "input[0].content[1]")
    assert fake_deepseek.requests == []


async def test_malformed_json_is_400(client: Client) -> None:
    answer = await client.post(b"{not json")
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_json"


async def test_another_method_is_405_and_the_path_without_v1_works(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    answer = await client.gateway.client.put(
        "/v1/responses", headers={"Authorization": f"Bearer {client.key}"}
    )
    assert answer.status_code == 405
    assert answer.json()["error"]["type"] == "invalid_request_error"
    fake_deepseek.scenario = Scenario(content="No v1.")
    async with openai.AsyncOpenAI(base_url=client.gateway.url, api_key=client.key, max_retries=0) as sdk:
        response = await sdk.responses.create(model="deepseek-chat", input="Hi")
        assert response.output_text == "No v1."
        assert (await sdk.responses.retrieve(response.id)).output_text == "No v1."


# --- failures ---


@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_refusal_before_the_reply_keeps_its_status(
    client: Client, fake_deepseek: FakeUpstream, stream: bool
) -> None:
    fake_deepseek.scenario = Scenario(status=503)
    answer = await client.post({"model": "deepseek-chat", "input": "Hi", "stream": stream})
    assert answer.status_code == 503
    assert "Server Overloaded" in answer.json()["error"]["message"]
    (charge,) = await settled(client, 1)
    assert charge.amount == 0
    assert charge.outcome == "error"
    await nothing_kept(client)


async def test_a_failure_mid_stream_ends_with_response_failed(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(tokens=40, disconnect_after=5)
    async with client.sdk.responses.stream(model="deepseek-chat", input="Hi") as stream:
        kinds = [event.type async for event in stream]
    assert kinds[0] == "response.created"
    assert "response.output_text.delta" in kinds
    assert kinds[-1] == "response.failed"
    (charge,) = await settled(client, 1)
    assert charge.outcome == "error"
    assert charge.completion_tokens > 0
    answer = await client.post({"model": "deepseek-chat", "input": "Hi", "stream": True})
    failed = sse(answer.text)[-1][1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "server_error"
    # A failed response is stored (GET shows what happened) ...
    assert (await client.sdk.responses.retrieve(failed["id"])).status == "failed"
    # ... and a chain from it carries its input, not its unfinished output.
    fake_deepseek.scenario = Scenario(content="Again.")
    await client.sdk.responses.create(model="deepseek-chat", input="Retry", previous_response_id=failed["id"])
    assert fake_deepseek.requests[-1].body["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": "Retry"},
    ]


async def test_a_slow_first_token_gets_keep_alive_comments(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., Any]
) -> None:
    config = write_config(
        deepseek_config(fake_deepseek.url) + PRICED_MODELS,
        replace={"[surfaces.openai_compat]\n": "[surfaces.openai_compat]\nkeepalive_interval = 0.1\n"},
    )
    gateway: RunningGateway = await gateway_factory(config)
    key, secret = await gateway.services.accounts.create_key("slow@example.com")
    await gateway.services.billing.top_up(key.user_id, 100_000_000)
    fake_deepseek.scenario = Scenario(first_token_delay=0.5, content="Finally.")
    answer = await gateway.client.post(
        "/v1/responses",
        json={"model": "deepseek-chat", "input": "Hi", "stream": True},
        headers={"Authorization": f"Bearer {secret}"},
    )
    assert answer.status_code == 200
    assert answer.text.split("\n\n").count(": keep-alive") >= 2
    assert sse(answer.text)[-1][1]["response"]["output"][0]["content"][0]["text"] == "Finally."


# --- streams of every shape (a scripted provider) ---


class Scripted(MockProvider):
    """Yields the events of :attr:`events`, whatever it is asked."""

    name = "scripted"
    events: ClassVar[list[ProviderEvent]] = []
    requests: ClassVar[list[ChatRequest]] = []

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        self.requests.append(request)
        for event in self.events:
            yield event


@pytest.fixture
async def scripted(
    write_config: Callable[..., Path], gateway_factory: Callable[..., Any]
) -> AsyncIterator[Client]:
    plugin = SimpleNamespace(__name__="scripted_provider", register_providers=hookimpl(lambda: [Scripted]))
    config = write_config('[providers.scripted]\nplugin = "scripted"\nmodels = ["mock-chat"]\n')
    config.write_text(
        config.read_text().replace(
            '[models.mock-chat]\nprovider = "mock"', '[models.mock-chat]\nprovider = "scripted"'
        )
    )
    gateway: RunningGateway = await gateway_factory(config, extra_plugins=[plugin])
    key, secret = await gateway.services.accounts.create_key("scripted@example.com")
    await gateway.services.billing.top_up(key.user_id, 100_000_000)
    client = Client(gateway, secret, key.user_id)
    yield client
    await client.sdk.close()


USAGE = Usage(prompt_tokens=10, completion_tokens=8, reasoning_tokens=2, cached_tokens=6)

SHAPES = {
    "parallel calls, interleaved": [
        ToolCallDelta(0, id="call_a", name="get_weather"),
        ToolCallDelta(1, id="call_b", name="get_time"),
        ToolCallDelta(0, arguments='{"city":'),
        ToolCallDelta(1, arguments='{"tz": "CET"}'),
        ToolCallDelta(0, arguments=' "Paris"}'),
        Finish("tool_calls", USAGE),
    ],
    "arguments only at the end": [
        ToolCallDelta(0, id="call_a", name="get_weather"),
        ToolCallDelta(0, arguments='{"city": "Paris"}'),
        Finish("tool_calls", USAGE),
    ],
    "no arguments at all": [ToolCallDelta(0, id="call_a", name="get_weather"), Finish("tool_calls", USAGE)],
    "tool calls with finish_reason stop": [
        ReasoningDelta("Hm."),
        ContentDelta("Let me check."),
        ToolCallDelta(0, id="call_a", name="get_weather", arguments='{"city": "Paris"}'),
        Finish("stop", USAGE),
    ],
    "reasoning, text, reasoning, text": [
        ReasoningDelta("One."),
        ContentDelta("A"),
        ReasoningDelta("Two."),
        ContentDelta("B"),
        Finish("stop", USAGE),
    ],
    "nothing at all": [Finish("stop", USAGE)],
    "reasoning only": [ReasoningDelta("Thinking, until the limit."), Finish("length", USAGE)],
    "a call's name after its first fragment": [
        ToolCallDelta(0, id="call_a", arguments='{"ci'),
        ToolCallDelta(0, name="get_weather", arguments='ty": "Paris"}'),
        Finish("tool_calls", USAGE),
    ],
    "insufficient system resource": [ContentDelta("Cut"), Finish("insufficient_system_resource", USAGE)],
}


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_every_stream_shape_makes_a_valid_sdk_stream(scripted: Client, shape: str) -> None:
    """Items open before their deltas, close in order, and the streamed and whole answers agree
    (dialects.md E.2, E.3, E.4: tool calls split, merged, interleaved or done-only)."""
    Scripted.events = SHAPES[shape]
    tools = [WEATHER, {**WEATHER, "name": "get_time"}]
    async with scripted.sdk.responses.stream(model="mock-chat", input="Go", tools=tools) as stream:
        events = [event async for event in stream]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for event in events:  # a call is announced with its name (an SDK keeps the first one it sees)
        if event.type == "response.output_item.added" and event.item.type == "function_call":
            assert event.item.name
    last = events[-1]
    whole = await scripted.sdk.responses.create(model="mock-chat", input="Go", tools=tools)
    assert last.type == f"response.{whole.status}"
    final = last.response  # type: ignore[union-attr]
    shape_of = [(i.type, getattr(i, "arguments", None), getattr(i, "call_id", None)) for i in final.output]
    whole_shape = [(i.type, getattr(i, "arguments", None), getattr(i, "call_id", None)) for i in whole.output]
    if shape == "reasoning, text, reasoning, text":  # a stream keeps each piece; a whole reply joins them
        assert [i.type for i in final.output] == ["reasoning", "message", "reasoning", "message"]
        assert [i.type for i in whole.output] == ["reasoning", "message"]
    else:
        assert shape_of == whole_shape
    assert final.output_text == whole.output_text
    calls = [i for i in final.output if i.type == "function_call"]
    for call in calls:
        json.loads(call.arguments or "{}")
    if shape == "parallel calls, interleaved":
        assert [(c.call_id, c.name, json.loads(c.arguments)) for c in calls] == [
            ("call_a", "get_weather", {"city": "Paris"}),
            ("call_b", "get_time", {"tz": "CET"}),
        ]
    if shape == "a call's name after its first fragment":
        assert [(c.call_id, c.name, json.loads(c.arguments)) for c in calls] == [
            ("call_a", "get_weather", {"city": "Paris"}),
        ]
    if shape == "reasoning only":  # the reasoning item alone, whole or streamed: no empty message
        assert [i.type for i in whole.output] == ["reasoning"]
        assert whole.status == "incomplete"
    if shape == "tool calls with finish_reason stop":
        assert whole.status == "completed"
        assert calls
        assert calls[0].status == "completed"
    if shape == "insufficient system resource":
        assert whole.status == "failed"
        assert whole.error is not None
    assert whole.usage is not None
    assert (whole.usage.input_tokens, whole.usage.input_tokens_details.cached_tokens) == (10, 6)
    assert whole.usage.output_tokens_details.reasoning_tokens == 2
    assert whole.usage.total_tokens == 18


async def test_replayed_output_items_with_ids_and_reasoning_are_accepted(scripted: Client) -> None:
    """What LangChain and Codex send back (dialects.md E.10): items with ids, reasoning items,
    list-valued function_call_output."""
    Scripted.events = [ContentDelta("ok"), Finish("stop", USAGE)]
    response = await scripted.sdk.responses.create(
        model="mock-chat",
        store=False,
        input=[
            {"role": "user", "content": "Weather?"},
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "Hm"}],
            },
            {
                "type": "message",
                "role": "assistant",
                "id": "msg_1",
                "status": "completed",
                "content": [{"type": "output_text", "text": "Checking.", "annotations": []}],
            },
            {
                "type": "function_call",
                "id": "fc_1",
                "call_id": "c1",
                "name": "get_weather",
                "arguments": "{}",
            },
            {
                "type": "function_call_output",
                "call_id": "c1",
                "output": [{"type": "input_text", "text": "Sunny"}],
            },
        ],
    )
    assert response.output_text == "ok"


# --- LangChain ---


async def test_langchain_invoke_stream_and_previous_response_id(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    """LangChain chains by the resp_ id of the last AI message (dialects.md B.9, E.10)."""
    langchain_openai = pytest.importorskip("langchain_openai")
    async with httpx.AsyncClient() as http:  # closed here: LangChain's own default client is process-wide
        model = langchain_openai.ChatOpenAI(
            model="deepseek-chat",
            base_url=client.gateway.url + "/v1",
            api_key=client.key,
            use_responses_api=True,
            use_previous_response_id=True,
            max_retries=0,
            http_async_client=http,
        )
        fake_deepseek.scenario = Scenario(content="Hello, Ada.")
        first = await model.ainvoke("I am Ada.")
        assert first.text == "Hello, Ada."
        assert first.response_metadata["id"].startswith("resp_")
        assert first.usage_metadata is not None
        assert first.usage_metadata["total_tokens"] > 0
        fake_deepseek.scenario = Scenario(content="You are Ada.")
        chunks = [
            chunk async for chunk in model.astream([("human", "I am Ada."), first, ("human", "Who am I?")])
        ]
    assert "".join(chunk.text for chunk in chunks) == "You are Ada."
    # Only the new message went: the rest came from the stored response.
    assert fake_deepseek.requests[-1].body["messages"] == [
        {"role": "user", "content": "I am Ada."},
        {"role": "assistant", "content": "Hello, Ada."},
        {"role": "user", "content": "Who am I?"},
    ]
    # Reasoning summaries stream to LangChain as reasoning blocks.
    fake_deepseek.scenario = Scenario(reasoning="Let me think.", content="Fine.")
    async with httpx.AsyncClient() as http:
        thinker = langchain_openai.ChatOpenAI(
            model="deepseek-reasoner",
            base_url=client.gateway.url + "/v1",
            api_key=client.key,
            use_responses_api=True,
            reasoning={"effort": "high", "summary": "auto"},
            max_retries=0,
            http_async_client=http,
        )
        total = None
        async for chunk in thinker.astream("Well?"):
            total = chunk if total is None else total + chunk
    assert total is not None
    assert total.text == "Fine."
    blocks = [b for b in total.content if isinstance(b, dict) and b.get("type") == "reasoning"]
    assert "".join(part["text"] for b in blocks for part in b.get("summary", [])) == "Let me think."


async def test_a_client_that_leaves_mid_stream_cancels_upstream_and_pays_for_what_it_got(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(tokens=200, token_delay=0.05)
    body = {"model": "deepseek-chat", "input": "Tell me a story", "stream": True}
    headers = {"Authorization": f"Bearer {client.key}"}
    async with (
        httpx.AsyncClient(base_url=client.gateway.url) as http,
        http.stream("POST", "/v1/responses", json=body, headers=headers) as response,
    ):
        received = 0
        async for line in response.aiter_lines():
            received += line.startswith("event: response.output_text.delta")
            if received >= 3:
                break
    # The upstream would stream for 10 s: a disconnect within the (generous) deadline is the
    # gateway's cancel, not the end of the reply.
    await fake_deepseek.wait_for_disconnect(timeout=5)
    (charge,) = await settled(client, 1)
    assert charge.outcome == "cancelled"
    assert 0 < charge.completion_tokens < 200
    await nothing_kept(client)  # nobody heard it end


async def test_reasoning_summary_and_a_trailing_slash(client: Client, fake_deepseek: FakeUpstream) -> None:
    fake_deepseek.scenario = Scenario(reasoning="Weigh it.", content="Yes.")
    answer = await client.gateway.client.post(
        "/v1/responses/",
        json={"model": "deepseek-reasoner", "input": "Well?", "reasoning": {"summary": "auto"}},
        headers={"Authorization": f"Bearer {client.key}"},
    )
    assert answer.status_code == 200, answer.text
    reasoning = answer.json()["output"][0]
    assert reasoning["type"] == "reasoning"
    assert reasoning["summary"] == [{"type": "summary_text", "text": "Weigh it."}]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Weigh it."}]


# --- node ---


async def test_the_node_sdk_creates_streams_chains_retrieves_and_deletes(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    if shutil.which("node") is None or not (NODE / "node_modules" / "openai").is_dir():
        if os.environ.get("CHATGATE_REQUIRE_NODE"):
            pytest.fail("CHATGATE_REQUIRE_NODE is set but node or tests/node/node_modules is missing")
        pytest.skip("node or tests/node/node_modules (npm ci --prefix tests/node) is missing")
    fake_deepseek.script(Scenario(content="Hello, node."), Scenario(content="Streamed to node."))
    env = {**os.environ, "OPENAI_BASE_URL": client.gateway.url + "/v1", "OPENAI_API_KEY": client.key}
    env["MODEL"] = "deepseek-chat"
    process = await asyncio.create_subprocess_exec(
        "node",
        "openai_responses.mjs",
        cwd=NODE,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["whole"]["text"] == "Hello, node."
    assert result["whole"]["status"] == "completed"
    assert result["streamed"] == "Streamed to node."
    assert result["kinds"] == ["response.created", "response.completed"]
    assert result["final"]["text"] == "Streamed to node."
    assert result["final"]["previous"] == result["whole"]["id"]
    assert result["retrieved"] == "Streamed to node."
    assert result["items"] == 1
    assert result["notFound"] == {"name": "NotFoundError", "status": 404}
    assert fake_deepseek.requests[-1].body["messages"] == [
        {"role": "user", "content": "Hello from node"},
        {"role": "assistant", "content": "Hello, node."},
        {"role": "user", "content": "Stream please"},
    ]


async def test_an_input_over_the_context_is_400_naming_input(scripted: Client) -> None:
    answer = await scripted.post({"model": "mock-chat", "input": "word " * 20_000})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "input")
    assert "4096 tokens" in error["message"]
    assert [e for e in await scripted.ledger() if e.kind != "topup"] == []


async def test_parallel_calls_that_all_say_index_0_are_separate_calls(scripted: Client) -> None:
    """An upstream that numbers every parallel call 0: each new id is a new call (dialects.md E.3)."""
    Scripted.events = [
        ToolCallDelta(0, id="call_a", name="get_weather", arguments='{"city": '),
        ToolCallDelta(0, arguments='"Paris"}'),
        ToolCallDelta(0, id="call_b", name="get_time", arguments='{"tz": "CET"}'),
        Finish("tool_calls", USAGE),
    ]
    tools = [WEATHER, {**WEATHER, "name": "get_time"}]
    async with scripted.sdk.responses.stream(model="mock-chat", input="Go", tools=tools) as stream:
        final = await stream.get_final_response()
    whole = await scripted.sdk.responses.create(model="mock-chat", input="Go", tools=tools)
    for response in (final, whole):
        calls = [i for i in response.output if i.type == "function_call"]
        assert [(c.call_id, c.name, json.loads(c.arguments)) for c in calls] == [
            ("call_a", "get_weather", {"city": "Paris"}),
            ("call_b", "get_time", {"tz": "CET"}),
        ]
        assert len({c.id for c in calls}) == 2


async def test_standalone_reasoning_is_not_carried_onto_a_later_turn(scripted: Client) -> None:
    Scripted.events = [ContentDelta("ok"), Finish("stop", USAGE)]
    reasoning = {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Hm"}]}
    await scripted.sdk.responses.create(
        model="mock-chat",
        store=False,
        input=[
            reasoning,  # no assistant turn follows it before the user speaks: it belongs to none
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"},
            {"role": "user", "content": "Next"},
        ],
    )
    messages = Scripted.requests[-1].messages
    assert [(m.role, m.content, m.reasoning) for m in messages] == [
        ("user", "Q", None),
        ("assistant", "A", None),
        ("user", "Next", None),
    ]


async def test_an_embedding_model_is_400_naming_model_and_reserves_nothing(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], funded: Funded
) -> None:
    embedding = '\n[models.deepseek-embedding]\nprovider = "deepseek"\nkind = "embedding"\ninput_price = 1\n'
    client = await funded(write_config(deepseek_config(fake_deepseek.url) + embedding))
    answer = await client.post({"model": "deepseek-embedding", "input": "Hi"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == ("model_not_supported", "model")
    assert fake_deepseek.requests == []
    assert [e for e in await client.ledger() if e.kind != "topup"] == []
    assert await client.gateway.services.conversations.list(client.user_id, "response") == []


# --- the chain's cost, retention ---


Funded = Callable[[Path], Awaitable[Client]]


@pytest.fixture
async def funded(gateway_factory: Callable[..., Any]) -> AsyncIterator[Funded]:
    """Start a gateway on a config and give it a funded key (its SDK closed at the end)."""
    clients: list[Client] = []

    async def start(config: Path) -> Client:
        gateway: RunningGateway = await gateway_factory(config)
        key, secret = await gateway.services.accounts.create_key("api@example.com")
        await gateway.services.billing.top_up(key.user_id, 100_000_000)
        clients.append(Client(gateway, secret, key.user_id))
        return clients[-1]

    yield start
    for client in clients:
        await client.sdk.close()


async def test_a_chain_past_the_context_stops_walking_at_once(scripted: Client) -> None:
    """The walk stops once what it loaded cannot fit: a deleted first link is never reached."""
    Scripted.events = [ContentDelta("ok"), Finish("stop", USAGE)]
    chunk = "word " * 800  # about 1200 tokens of mock-chat's 4096
    previous = None
    ids = []
    for _ in range(3):
        body = {
            "model": "mock-chat",
            "input": chunk,
            **({"previous_response_id": previous} if previous else {}),
        }
        answer = await scripted.post(body)
        assert answer.status_code == 200, answer.text
        previous = answer.json()["id"]
        ids.append(previous)
    charges = len([e for e in await scripted.ledger() if e.kind == "charge"])
    await scripted.sdk.responses.delete(ids[0])
    # 1800 tokens of input and two links of 1200 pass 4096 before the walk reaches the first link
    # (a walk to the end would answer previous_response_not_found naming it).
    answer = await scripted.post(
        {"model": "mock-chat", "input": "word " * 1200, "previous_response_id": ids[2]}
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "input")
    assert "4096 tokens" in error["message"]
    assert len([e for e in await scripted.ledger() if e.kind in ("charge", "reservation")]) == charges
    # A short input on the same chain still walks to its end, and finds the link missing.
    answer = await scripted.post({"model": "mock-chat", "input": "Hi", "previous_response_id": ids[2]})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "previous_response_not_found"


async def _conversations(gateway: RunningGateway, user_id: int) -> list[int]:
    return [c.id for c in await gateway.services.conversations.list(user_id, "response")]


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Wait until ``check()`` holds (5 s: a bound for a stuck wait, not a timing expectation)."""
    async with asyncio.timeout(5):
        while True:
            if await check():
                return
            await asyncio.sleep(0.01)


async def test_expired_responses_are_not_found_and_then_swept(
    fake_deepseek: FakeUpstream,
    write_config: Callable[..., Path],
    gateway_factory: Callable[..., Any],
    funded: Funded,
) -> None:
    # A retention under a millisecond: a response is expired as soon as it was answered.
    config = write_config(
        deepseek_config(fake_deepseek.url) + PRICED_MODELS,
        replace={"[surfaces.openai_compat]\n": "[surfaces.openai_compat]\nresponses_retention_days = 1e-9\n"},
    )
    client = await funded(config)
    response = await client.sdk.responses.create(model="deepseek-chat", input="Hi")
    assert response.output_text
    headers = {"Authorization": f"Bearer {client.key}"}

    async def gone() -> bool:  # past the stamp's millisecond, it is not found
        answer = await client.gateway.client.get(f"/v1/responses/{response.id}", headers=headers)
        return answer.status_code == 404

    await eventually(gone)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.sdk.responses.create(model="deepseek-chat", input="Hi", previous_response_id=response.id)
    assert caught.value.code == "previous_response_not_found"
    # Not found on read, still in the store: the sweep runs when a surface opens, then every 5 minutes.
    assert len(await _conversations(client.gateway, client.user_id)) == 1
    second: RunningGateway = await gateway_factory(config)  # another process on the same store

    async def swept() -> bool:
        return not await _conversations(second, client.user_id)

    await eventually(swept)


async def test_empty_slots_a_dead_process_left_are_swept_and_answered_ones_kept(
    fake_deepseek: FakeUpstream,
    write_config: Callable[..., Path],
    gateway_factory: Callable[..., Any],
    funded: Funded,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from plugins.openai_compat.responses_api import sweep

    monkeypatch.setattr(sweep, "SLOT_LIFETIME", timedelta(0))  # a day, in production
    config = write_config(
        deepseek_config(fake_deepseek.url) + PRICED_MODELS,
        replace={"[surfaces.openai_compat]\n": "[surfaces.openai_compat]\nresponses_retention_days = 0\n"},
    )
    client = await funded(config)
    response = await client.sdk.responses.create(model="deepseek-chat", input="Hi")
    # What a process that died mid-reply leaves: the response's conversation, never filled.
    left = await client.gateway.services.conversations.create(client.user_id, "response")
    second: RunningGateway = await gateway_factory(config)

    async def swept() -> bool:
        return left.id not in await _conversations(second, client.user_id)

    await eventually(swept)
    assert len(await _conversations(second, client.user_id)) == 1
    assert (await client.sdk.responses.retrieve(response.id)).output_text == response.output_text


async def test_store_responses_false_keeps_nothing_whatever_the_request_says(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], funded: Funded
) -> None:
    config = write_config(
        deepseek_config(fake_deepseek.url) + PRICED_MODELS,
        replace={"[surfaces.openai_compat]\n": "[surfaces.openai_compat]\nstore_responses = false\n"},
    )
    client = await funded(config)
    response = await client.sdk.responses.create(model="deepseek-chat", input="Hi", store=True)
    assert response.store is False
    async with client.sdk.responses.stream(model="deepseek-chat", input="Hi") as stream:
        streamed = await stream.get_final_response()
    assert streamed.store is False
    for each in (response, streamed):
        with pytest.raises(openai.NotFoundError):
            await client.sdk.responses.retrieve(each.id)
    assert await _conversations(client.gateway, client.user_id) == []
