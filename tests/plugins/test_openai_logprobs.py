"""Logprobs and system_fingerprint on POST /v1/chat/completions: passed through from the upstream,
streamed and whole, checked on the way in; driven by the official openai SDK and raw HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from core.testing.fake_upstream import FINGERPRINT, FakeUpstream, Scenario
from providers.openai_wire import decode_chunk
from tests.conftest import PRICED_MODELS, RunningGateway, deepseek_config, funded_key
from tests.plugins.test_openai_chat import Client, settled

HI = [{"role": "user", "content": "Say hello to the world"}]


@pytest.fixture
async def client(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., object]
) -> AsyncIterator[Client]:
    config = write_config(deepseek_config(fake_deepseek.url, extra="max_retries = 0") + PRICED_MODELS)
    gateway: RunningGateway = await gateway_factory(config)  # type: ignore[assignment,misc]
    client = Client(gateway, *await funded_key(gateway))
    yield client
    await client.sdk.close()


def events(text: str) -> list[dict[str, Any]]:
    """The JSON chunks of an SSE body, [DONE] left out."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line.removeprefix("data: ")))
    return out


# --- logprobs, through the fake DeepSeek (non-thinking mode) ---


async def test_sdk_whole_reply_carries_the_upstreams_logprobs(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(content="Hello there world")
    answer = await client.sdk.chat.completions.create(
        model="deepseek-chat", messages=HI, logprobs=True, top_logprobs=2
    )
    sent = fake_deepseek.requests[-1].body
    assert sent["logprobs"] is True
    assert sent["top_logprobs"] == 2
    choice = answer.choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.refusal is None
    tokens = choice.logprobs.content or []
    assert "".join(t.token for t in tokens) == choice.message.content == "Hello there world"
    for token in tokens:
        assert token.logprob <= 0
        assert token.bytes == list(token.token.encode())
        assert len(token.top_logprobs) == 2
        assert token.top_logprobs[0].token == token.token
    assert answer.system_fingerprint == FINGERPRINT


async def test_sdk_stream_carries_logprobs_per_chunk_and_the_fingerprint_on_every_chunk(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(content="One two three four")
    stream = await client.sdk.chat.completions.create(
        model="deepseek-chat",
        messages=HI,
        logprobs=True,
        top_logprobs=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.system_fingerprint == FINGERPRINT for chunk in chunks)
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant"
    assert first.logprobs is not None
    assert first.logprobs.content == []
    texts: list[str] = []
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.delta.content:
                assert choice.logprobs is not None
                assert [t.token for t in choice.logprobs.content or []] == [choice.delta.content]
                texts.append(choice.delta.content)
    assert "".join(texts) == "One two three four"
    assert chunks[-1].usage is not None


async def test_sdk_stream_helper_gathers_logprobs_and_fingerprint(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(content="Gathered by the helper")
    async with client.sdk.chat.completions.stream(
        model="deepseek-chat", messages=HI, logprobs=True, top_logprobs=0
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    assert final.system_fingerprint == FINGERPRINT
    logprobs = final.choices[0].logprobs
    assert logprobs is not None
    assert "".join(t.token for t in logprobs.content or []) == "Gathered by the helper"
    assert all(t.top_logprobs == [] for t in logprobs.content or [])


async def test_logprobs_are_null_when_not_asked(client: Client, fake_deepseek: FakeUpstream) -> None:
    whole = await client.post({"model": "deepseek-chat", "messages": HI})
    assert whole.json()["choices"][0]["logprobs"] is None
    assert "logprobs" not in fake_deepseek.requests[-1].body
    streamed = await client.post({"model": "deepseek-chat", "messages": HI, "stream": True})
    assert all(c["choices"][0]["logprobs"] is None for c in events(streamed.text) if c["choices"])


async def test_upstream_refusing_logprobs_in_thinking_mode_is_a_400_charged_nothing(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    before = await client.balance()
    response = await client.post({"model": "deepseek-reasoner", "messages": HI, "logprobs": True})
    assert response.status_code == 400
    assert "thinking mode" in response.json()["error"]["message"]
    [entry] = [e for e in await settled(client, 1) if e.kind == "charge"]
    assert entry.amount == 0
    assert await client.balance() == before


# --- system_fingerprint ---


async def test_no_fingerprint_is_invented_when_the_upstream_sent_none(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(fingerprint=False)
    whole = await client.post({"model": "deepseek-chat", "messages": HI})
    assert whole.status_code == 200
    assert "system_fingerprint" not in whole.json()
    streamed = await client.post(
        {"model": "deepseek-chat", "messages": HI, "stream": True, "stream_options": {"include_usage": True}}
    )
    chunks = events(streamed.text)
    assert chunks
    assert all("system_fingerprint" not in chunk for chunk in chunks)


async def test_fingerprint_rides_on_raw_chunks_before_choices(client: Client) -> None:
    streamed = await client.post(
        {"model": "deepseek-chat", "messages": HI, "stream": True, "stream_options": {"include_usage": True}}
    )
    chunks = events(streamed.text)
    assert all(chunk["system_fingerprint"] == FINGERPRINT for chunk in chunks)
    assert list(chunks[0])[:6] == ["id", "object", "created", "model", "system_fingerprint", "choices"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["total_tokens"] > 0


# --- bad values, refused before anything goes upstream ---


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logprobs": "yes"}, "logprobs"),
        ({"logprobs": 1}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": "3"}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 2.5}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ],
)
async def test_bad_logprobs_fields_answer_400_naming_them(
    client: Client, fake_deepseek: FakeUpstream, fields: dict[str, Any], param: str
) -> None:
    response = await client.post({"model": "deepseek-chat", "messages": HI, **fields})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert param in error["message"]
    assert error["type"] == "invalid_request_error"
    assert fake_deepseek.requests == []
    assert [e.kind for e in await client.ledger()] == ["topup"]


# --- the mock, offline ---


async def test_mock_gives_deterministic_logprobs_offline(gateway: RunningGateway) -> None:
    key, secret = await gateway.services.accounts.create_key("mock@example.com")
    await gateway.services.billing.top_up(key.user_id, 100_000_000)
    client = Client(gateway, secret, key.user_id)
    async with client.sdk:
        await _mock_logprobs(client)


async def _mock_logprobs(client: Client) -> None:
    body = {"model": "mock-chat", "messages": HI, "logprobs": True, "top_logprobs": 3}
    first, second = (await client.post(body)).json(), (await client.post(body)).json()
    assert first["choices"][0]["logprobs"] == second["choices"][0]["logprobs"]
    content = first["choices"][0]["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == first["choices"][0]["message"]["content"]
    assert all(len(t["top_logprobs"]) == 3 and t["logprob"] <= 0 for t in content)
    assert "system_fingerprint" not in first  # the mock has no backend to name
    plain = (await client.post({"model": "mock-chat", "messages": HI})).json()
    assert plain["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert plain["choices"][0]["logprobs"] is None
    streamed = await client.post({**body, "stream": True})
    tokens = [
        t["token"]
        for c in events(streamed.text)
        for choice in c["choices"]
        for t in (choice["logprobs"] or {}).get("content", [])
    ]
    assert "".join(tokens) == first["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("logprobs", "fingerprint", "entries", "kept"),
    [
        (
            {"content": [{"token": "Hi", "logprob": -0.1}, "junk", 3]},
            "fp_1",
            ({"token": "Hi", "logprob": -0.1},),
            "fp_1",
        ),
        ({"content": None, "refusal": None}, 42, None, None),
        ([1, 2], {"not": "a string"}, None, None),
        ("nonsense", None, None, None),
        ({"content": "not a list"}, ["fp"], None, None),
    ],
)
def test_an_upstreams_nonconforming_logprobs_or_fingerprint_do_not_fail_the_chunk(
    logprobs: Any, fingerprint: Any, entries: Any, kept: Any
) -> None:
    # Before, a chunk whose optional extras were not OpenAI's shape failed to decode (the whole
    # reply failed); now only the parts that are OpenAI's shape are kept.
    raw = {
        "choices": [{"index": 0, "delta": {"content": "Hi"}, "logprobs": logprobs}],
        "system_fingerprint": fingerprint,
    }
    chunk = decode_chunk(json.dumps(raw).encode())
    assert chunk.choices is not None
    assert chunk.choices[0].entries() == entries
    assert chunk.fingerprint() == kept
