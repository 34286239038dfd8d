"""The fake DeepSeek server itself: what it puts on the wire matches the captures in the research notes.

These tests talk to the fake with plain httpx, raw sockets and the official openai SDK; no provider
code is involved. The shapes checked here come from /work/shared/research/wire-formats.md §1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from core.testing.fake_upstream import DEFAULT_API_KEY, FakeUpstream, Scenario, ToolCallSpec, split_pieces
from tests.conftest import free_port

KEY = DEFAULT_API_KEY
CHUNK_KEYS = ["id", "object", "created", "model", "system_fingerprint", "choices"]
CHOICE_KEYS = ["index", "delta", "logprobs", "finish_reason"]
USAGE_KEYS = [
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
    "prompt_cache_hit_tokens",
    "prompt_cache_miss_tokens",
]
NON_THINKING_USAGE_KEYS = [k for k in USAGE_KEYS if k != "completion_tokens_details"]
TRACE_ID = re.compile(r"[0-9a-f]{32}")
DESERIALIZE = "Failed to deserialize the JSON body into the target type: "
WEATHER = ToolCallSpec(name="weather", arguments='{"location": "San Francisco", "unit": "celsius"}')


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as server:
        yield server


@pytest.fixture
async def client(fake: FakeUpstream) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=fake.url, headers=headers, timeout=5) as http:
        yield http


def chat(
    content: str = "How do plants make food?", model: str = "deepseek-v4-flash", **fields: Any
) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}


def events(body: str) -> list[str]:
    """The SSE events of a stream body, without their terminating blank lines."""
    assert body.endswith("\n\n"), body[-80:]
    return body[:-2].split("\n\n")


def chunks_of(body: str) -> list[dict[str, Any]]:
    """The JSON chunks of a complete stream; checks each event is one data line and [DONE] comes last."""
    found = events(body)
    assert found[-1] == "data: [DONE]"
    chunks = []
    for event in found[:-1]:
        if event.startswith(":"):
            continue
        assert event.startswith("data: "), event
        assert "\n" not in event, event
        chunks.append(json.loads(event.removeprefix("data: ")))
    return chunks


def deltas_of(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["choices"][0]["delta"] for c in chunks if c["choices"]]


def decode_chunked(data: bytes) -> tuple[list[bytes], bytes]:
    """Split a chunked body into its chunks; returns them and whatever follows the terminator."""
    chunks: list[bytes] = []
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        assert sep, "chunk size line not terminated"
        size = int(size_line, 16)
        if size == 0:
            assert data.startswith(b"\r\n")
            return chunks, data[2:]
        assert data[size : size + 2] == b"\r\n", "chunk data not followed by CRLF"
        chunks.append(data[:size])
        data = data[size + 2 :]


async def drain(lines: AsyncIterator[str]) -> list[str]:
    return [line async for line in lines]


async def raw_exchange(fake: FakeUpstream, payload: bytes) -> bytes:
    """Send raw bytes on a fresh connection and read until the fake closes or cuts it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(fake.url.rsplit(":", 1)[1]))
    writer.write(payload)
    received = bytearray()
    try:
        async with asyncio.timeout(5):
            while data := await reader.read(65536):
                received += data
    except ConnectionResetError:
        pass  # the fake aborted: what arrived before is what matters
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):  # the fake may have reset it already
            await writer.wait_closed()
    return bytes(received)


def post_bytes(body: dict[str, Any], *, path: str = "/chat/completions", close: bool = False) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    )
    if close:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode() + data


# -- streams -----------------------------------------------------------------------------------------


async def test_streamed_thinking_answer_matches_deepseek_chunk_for_chunk(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.scenario = Scenario(tokens=5, reasoning_tokens=3)
    body = chat(stream=True, stream_options={"include_usage": True})
    response = await client.post("/chat/completions", json=body)

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["connection"] == "keep-alive"
    assert TRACE_ID.fullmatch(response.headers["x-ds-trace-id"])
    chunks = chunks_of(response.text)
    assert len(chunks) == 1 + 3 + 5 + 1
    first = chunks[0]
    assert uuid.UUID(first["id"]).version == 4
    for chunk in chunks:
        assert list(chunk) == [*CHUNK_KEYS, "usage"]
        assert (chunk["id"], chunk["created"]) == (first["id"], first["created"])
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "deepseek-v4-flash"
        assert TRACE_ID.fullmatch(chunk["system_fingerprint"])
        assert [list(choice) for choice in chunk["choices"]] == [CHOICE_KEYS]
        assert chunk["choices"][0]["index"] == 0
        assert chunk["choices"][0]["logprobs"] is None

    deltas = deltas_of(chunks)
    assert list(deltas[0]) == ["role", "content", "reasoning_content"]
    assert deltas[0] == {"role": "assistant", "content": None, "reasoning_content": ""}
    for delta in deltas[1:4]:
        assert list(delta) == ["content", "reasoning_content"]
        assert delta["content"] is None
        assert delta["reasoning_content"]
    for delta in deltas[4:9]:
        assert list(delta) == ["content", "reasoning_content"]
        assert delta["content"]
        assert delta["reasoning_content"] is None
    assert deltas[-1] == {"content": "", "reasoning_content": None}
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 9 + ["stop"]
    assert [c["usage"] for c in chunks[:-1]] == [None] * 9

    usage = chunks[-1]["usage"]
    assert list(usage) == USAGE_KEYS
    assert usage["completion_tokens"] == 8
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 3}
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8
    assert usage["prompt_tokens"] == usage["prompt_cache_hit_tokens"] + usage["prompt_cache_miss_tokens"] > 0
    assert usage["prompt_tokens_details"] == {"cached_tokens": usage["prompt_cache_hit_tokens"]}
    answer = "".join(d["content"] for d in deltas[4:9])
    assert answer.startswith("You said How do plants")


@pytest.mark.parametrize(
    "body",
    [
        chat(thinking={"type": "disabled"}, stream=True),
        chat(model="deepseek-chat", stream=True),  # the legacy alias means "thinking off"
    ],
    ids=["thinking-disabled", "deepseek-chat"],
)
async def test_non_thinking_stream_has_no_reasoning(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    chunks = chunks_of((await client.post("/chat/completions", json=body)).text)
    deltas = deltas_of(chunks)

    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all(list(d) == ["content"] and d["content"] for d in deltas[1:-1])
    assert len(deltas) == 1 + 24 + 1
    assert deltas[-1] == {"content": ""}
    assert chunks[-1]["model"] == body["model"]
    assert list(chunks[-1]["usage"]) == NON_THINKING_USAGE_KEYS
    assert chunks[-1]["usage"]["completion_tokens"] == 24


@pytest.mark.parametrize("stream_options", [None, {"include_usage": False}])
async def test_without_include_usage_earlier_chunks_have_no_usage_key(
    client: httpx.AsyncClient, stream_options: dict[str, bool] | None
) -> None:
    body = chat(stream=True) if stream_options is None else chat(stream=True, stream_options=stream_options)
    chunks = chunks_of((await client.post("/chat/completions", json=body)).text)

    assert all(list(c) == CHUNK_KEYS for c in chunks[:-1])
    assert list(chunks[-1]) == [*CHUNK_KEYS, "usage"]  # DeepSeek sends usage on the last chunk anyway
    assert chunks[-1]["usage"]["completion_tokens"] == 12 + 24


async def test_trailer_chunk_mode_sends_openai_style_usage(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.scenario = Scenario(usage="trailer_chunk", tokens=3, reasoning_tokens=2)
    body = chat(stream=True, stream_options={"include_usage": True})
    chunks = chunks_of((await client.post("/chat/completions", json=body)).text)

    *_, finish, trailer = chunks
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert finish["usage"] is None
    assert list(trailer) == [*CHUNK_KEYS, "usage"]
    assert trailer["choices"] == []
    assert trailer["id"] == finish["id"]
    assert trailer["usage"]["completion_tokens"] == 5

    fake.scenario = Scenario(usage="trailer_chunk")
    chunks = chunks_of((await client.post("/chat/completions", json=chat(stream=True))).text)
    assert "usage" not in chunks[-2]
    assert chunks[-1]["choices"] == []


async def test_usage_absent_mode_sends_none(fake: FakeUpstream, client: httpx.AsyncClient) -> None:
    fake.scenario = Scenario(usage="absent")
    body = chat(stream=True, stream_options={"include_usage": True})
    chunks = chunks_of((await client.post("/chat/completions", json=body)).text)
    assert all(c["usage"] is None for c in chunks)
    chunks = chunks_of((await client.post("/chat/completions", json=chat(stream=True))).text)
    assert all("usage" not in c for c in chunks)
    completion = (await client.post("/chat/completions", json=chat())).json()
    assert list(completion) == ["id", "object", "created", "model", "choices", "system_fingerprint"]


async def test_streamed_tool_call_comes_in_fragments(fake: FakeUpstream, client: httpx.AsyncClient) -> None:
    fake.scenario = Scenario(tool_call=WEATHER, reasoning_tokens=2)
    body = chat("Weather in San Francisco?", stream=True, tools=[{"type": "function"}])
    chunks = chunks_of((await client.post("/chat/completions", json=body)).text)
    deltas = deltas_of(chunks)

    assert deltas[0] == {"role": "assistant", "content": None, "reasoning_content": ""}
    assert all(d["content"] is None for d in deltas[1:3])
    opening = deltas[3]
    assert list(opening["tool_calls"][0]) == ["index", "id", "type", "function"]
    call = opening["tool_calls"][0]
    assert re.fullmatch(r"call_00_[A-Za-z0-9]{24}", call["id"])
    assert (call["index"], call["type"], call["function"]) == (
        0,
        "function",
        {"name": "weather", "arguments": ""},
    )
    pieces = deltas[4:-1]
    assert len(pieces) >= 3
    assert all(
        d
        == {
            "tool_calls": [
                {"index": 0, "function": {"arguments": d["tool_calls"][0]["function"]["arguments"]}}
            ]
        }
        for d in pieces
    )
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in pieces) == WEATHER.arguments
    assert pieces[0]["tool_calls"][0]["function"]["arguments"] == "{"
    assert not any(d.get("content") for d in deltas)  # no answer text at all
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] == 2 + 1 + len(pieces)


async def test_non_streamed_tool_call_matches_capture(fake: FakeUpstream, client: httpx.AsyncClient) -> None:
    fake.scenario = Scenario(tool_call=WEATHER, reasoning="I'll call the weather tool.")
    completion = (await client.post("/chat/completions", json=chat("Weather?"))).json()

    message = completion["choices"][0]["message"]
    assert list(message) == ["role", "content", "reasoning_content", "tool_calls"]
    assert message["content"] == ""
    assert message["reasoning_content"] == "I'll call the weather tool."
    (call,) = message["tool_calls"]
    assert list(call) == ["index", "id", "type", "function"]
    assert call["function"] == {"name": "weather", "arguments": WEATHER.arguments}
    assert completion["choices"][0]["finish_reason"] == "tool_calls"


async def test_keepalive_comments_come_before_the_first_event(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.scenario = Scenario(keepalives=2, keepalive_interval=0.01)
    found = events((await client.post("/chat/completions", json=chat(stream=True))).text)
    assert found[:2] == [": keep-alive", ": keep-alive"]
    assert all(e.startswith("data: ") for e in found[2:])


async def test_max_tokens_caps_reasoning_and_content(fake: FakeUpstream, client: httpx.AsyncClient) -> None:
    fake.scenario = Scenario(tokens=10, reasoning_tokens=3)
    chunks = chunks_of((await client.post("/chat/completions", json=chat(stream=True, max_tokens=5))).text)
    deltas = deltas_of(chunks)

    assert sum(1 for d in deltas if d.get("reasoning_content")) == 3
    assert sum(1 for d in deltas if d.get("content")) == 2
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 5

    completion = (await client.post("/chat/completions", json=chat(max_tokens=2))).json()
    assert completion["choices"][0]["finish_reason"] == "length"
    assert completion["choices"][0]["message"]["content"] == ""
    assert completion["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}


async def test_content_reasoning_and_finish_reason_can_be_set(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.scenario = Scenario(
        content="Hello, 世界!", reasoning="Greet.", finish_reason="insufficient_system_resource"
    )
    chunks = chunks_of((await client.post("/chat/completions", json=chat(stream=True))).text)
    deltas = deltas_of(chunks)
    assert "".join(d["content"] or "" for d in deltas) == "Hello, 世界!"
    assert "".join(d["reasoning_content"] or "" for d in deltas) == "Greet."
    assert chunks[-1]["choices"][0]["finish_reason"] == "insufficient_system_resource"


def test_split_pieces_joins_back_and_splits_cjk_per_character() -> None:
    for text in ["Hello, world!\n", "  leading and trailing  ", "", "怎样组织 a project?", "a\n\nb"]:
        assert "".join(split_pieces(text)) == text
    assert split_pieces("Hi there") == ["Hi", " there"]
    assert split_pieces("怎样 ok") == ["怎", "样", " ok"]


# -- non-streamed answers ------------------------------------------------------------------------------


async def test_non_streamed_answer_matches_capture(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=chat())

    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    completion = response.json()
    assert list(completion) == ["id", "object", "created", "model", "choices", "usage", "system_fingerprint"]
    assert completion["object"] == "chat.completion"
    (choice,) = completion["choices"]
    assert list(choice) == ["index", "message", "logprobs", "finish_reason"]
    assert list(choice["message"]) == ["role", "content", "reasoning_content"]
    assert choice["finish_reason"] == "stop"
    assert completion["usage"]["completion_tokens"] == 12 + 24
    # Compact JSON, as DeepSeek sends it.
    assert b'"object":"chat.completion","created":' in response.content


async def test_non_streamed_keepalives_are_blank_lines_before_the_json(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.scenario = Scenario(keepalives=2)
    response = await client.post("/chat/completions", json=chat(thinking={"type": "disabled"}))

    assert response.headers["transfer-encoding"] == "chunked"
    assert response.text.startswith("\n\n{")
    completion = json.loads(response.text.strip())
    assert list(completion["choices"][0]["message"]) == ["role", "content"]
    assert "completion_tokens_details" not in completion["usage"]


async def test_json_for_stream_answers_a_stream_request_with_json(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.scenario = Scenario(json_for_stream=True)
    response = await client.post("/chat/completions", json=chat(stream=True))
    assert response.headers["content-type"] == "application/json"
    assert response.json()["object"] == "chat.completion"


async def test_empty_body(fake: FakeUpstream, client: httpx.AsyncClient) -> None:
    fake.script(Scenario(empty_body=True), Scenario(empty_body=True))
    for body in (chat(), chat(stream=True)):
        response = await client.post("/chat/completions", json=body)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.headers["content-length"] == "0"
        assert response.content == b""


# -- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message", "error_type"),
    [
        (400, "Invalid Format", "invalid_request_error"),
        (401, "Authentication Fails (no such user)", "authentication_error"),
        (402, "Insufficient Balance", "unknown_error"),
        (422, "Invalid Parameters", "invalid_request_error"),
        (429, "Rate Limit Reached", "rate_limit_error"),
        (500, "Server Error", "server_error"),
        (503, "Server Overloaded", "server_error"),
    ],
)
async def test_error_status_has_deepseek_body(
    fake: FakeUpstream, client: httpx.AsyncClient, status: int, message: str, error_type: str
) -> None:
    fake.scenario = Scenario(status=status)
    response = await client.post("/chat/completions", json=chat(stream=True))

    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert TRACE_ID.fullmatch(response.headers["x-ds-trace-id"])
    assert "retry-after" not in response.headers
    error = {"message": message, "type": error_type, "param": None, "code": "invalid_request_error"}
    assert response.content == json.dumps({"error": error}, separators=(",", ":")).encode()


async def test_error_message_retry_after_and_delay(fake: FakeUpstream, client: httpx.AsyncClient) -> None:
    fake.scenario = Scenario(status=429, message="Slow down", retry_after="2", delay=0.1)
    started = time.monotonic()
    response = await client.post("/chat/completions", json=chat())
    assert time.monotonic() - started >= 0.1
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.json()["error"]["message"] == "Slow down"


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        (None, "Authentication Fails (auth header format should be Bearer sk-...)"),
        (f"Token {KEY}", "Authentication Fails (auth header format should be Bearer sk-...)"),
        ("Bearer sk-wrong-key-9876", "Authentication Fails, Your api key: ****9876 is invalid"),
    ],
)
async def test_auth_failures(fake: FakeUpstream, authorization: str | None, message: str) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with httpx.AsyncClient(base_url=fake.url, headers=headers) as http:
        for response in (await http.post("/chat/completions", json=chat()), await http.get("/models")):
            assert response.status_code == 401
            assert response.json() == {
                "error": {
                    "message": message,
                    "type": "authentication_error",
                    "param": None,
                    "code": "invalid_request_error",
                }
            }


TOOL_TURN = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {"id": "call_00_x", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    ],
}
TOOL_RESULT = {"role": "tool", "tool_call_id": "call_00_x", "content": "sunny"}


def history(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "model": "deepseek-v4-flash",
        "messages": [{"role": "user", "content": "Hi"}, *messages],
        **fields,
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{bad", "Failed to parse the request body as JSON: key must be a string at line 1 column 2"),
        (b"", "Failed to parse the request body as JSON: EOF while parsing a value at line 1 column 0"),
        ({"messages": []}, DESERIALIZE + "missing field `model` at line 1 column 15"),
        (
            chat() | {"messages": [{"role": "developer", "content": "x"}]},
            DESERIALIZE + "messages[0].role: unknown variant `developer`, expected one of "
            "`system`, `user`, `assistant`, `tool`, `latest_reminder` at line 1 column 77",
        ),
        (chat(model="deepseek-r2"), "Model Not Exist"),
        (chat() | {"messages": []}, "Empty input messages"),
        (chat(max_tokens=0), "Invalid max_tokens value, the valid range of max_tokens is [1, 384000]"),
        (chat(max_tokens=384_001), "Invalid max_tokens value, the valid range of max_tokens is [1, 384000]"),
        (chat(logprobs=True), "logprobs and top_logprobs are not supported in thinking mode"),
        (
            history(TOOL_TURN, TOOL_RESULT),
            "The `reasoning_content` in the thinking mode must be passed back to the API.",
        ),
        (
            history(
                TOOL_TURN | {"reasoning_content": "look it up"},
                TOOL_RESULT,
                {"role": "assistant", "content": "Sunny."},
            ),
            "The `reasoning_content` in the thinking mode must be passed back to the API.",
        ),
    ],
    ids=[
        "not-json",
        "empty",
        "missing-model",
        "bad-role",
        "unknown-model",
        "no-messages",
        "max-tokens-0",
        "max-tokens-too-big",
        "logprobs-thinking",
        "tool-turn-without-reasoning",
        "later-turn-without-reasoning",
    ],
)
async def test_validation_like_deepseek(
    client: httpx.AsyncClient, body: bytes | dict[str, Any], message: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    response = await client.post("/chat/completions", content=content)
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": message,
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_request_error",
    }


@pytest.mark.parametrize(
    "body",
    [
        history(
            {"role": "assistant", "content": "Hello", "reasoning_content": "ignored"},
            {"role": "user", "content": "x"},
        ),
        history(
            {"role": "assistant", "content": "Hello"}, TOOL_TURN | {"reasoning_content": ""}, TOOL_RESULT
        ),
        history(TOOL_TURN, TOOL_RESULT, thinking={"type": "disabled"}),
        history(logprobs=True, thinking={"type": "disabled"}),
        history(max_tokens=384_000),
    ],
    ids=[
        "plain-turn-reasoning-ignored",
        "empty-reasoning-accepted",
        "non-thinking",
        "logprobs-non-thinking",
        "max",
    ],
)
async def test_valid_requests_pass(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


# -- the connection ------------------------------------------------------------------------------------


async def test_keep_alive_serves_sequential_requests_on_one_connection(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    first = await client.post("/chat/completions", json=chat(stream=True))
    second = await client.post("/v1/chat/completions", json=chat())
    third = await client.get("/models")

    assert (first.status_code, second.status_code, third.status_code) == (200, 200, 200)
    assert fake.connections == 1
    assert [r.connection for r in fake.requests] == [1, 1]
    assert [r.path for r in fake.requests] == ["/chat/completions", "/v1/chat/completions"]
    received = fake.requests[1]
    assert received.method == "POST"
    assert received.body == chat()
    assert json.loads(received.raw) == chat()
    assert received.headers["authorization"] == f"Bearer {KEY}"
    assert received.at <= time.monotonic()


async def test_bytes_on_the_wire(fake: FakeUpstream) -> None:
    """Two requests on one raw socket: exact chunk framing, one SSE event per chunk, then Content-Length."""
    fake.script(Scenario(tokens=2, reasoning_tokens=1, keepalives=1))
    raw = await raw_exchange(fake, post_bytes(chat(stream=True)) + post_bytes(chat(), close=True))

    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    assert "Transfer-Encoding: chunked" in lines
    assert "Connection: keep-alive" in lines
    assert "Content-Type: text/event-stream; charset=utf-8" in lines
    chunks, rest = decode_chunked(rest)
    assert chunks[0] == b": keep-alive\n\n"
    assert chunks[-1] == b"data: [DONE]\n\n"
    assert len(chunks) == 1 + (1 + 1 + 2 + 1) + 1
    assert all(
        c.startswith(b"data: {") and c.endswith(b"}\n\n") and c.count(b"\n") == 2 for c in chunks[1:-1]
    )

    head, _, body = rest.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    assert "Connection: close" in lines
    assert "Content-Type: application/json" in lines
    assert f"Content-Length: {len(body)}" in lines
    assert json.loads(body)["object"] == "chat.completion"
    assert fake.connections == 1


async def test_chunked_request_body_is_read(fake: FakeUpstream) -> None:
    data = json.dumps(chat("chunked")).encode()
    body = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, data[:10], len(data) - 10, data[10:])
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    raw = await raw_exchange(fake, head.encode() + body)
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert fake.requests[0].body == chat("chunked")


async def test_disconnect_is_noticed_during_token_delay(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.scenario = Scenario(token_delay=0.5)
    async with client.stream("POST", "/chat/completions", json=chat(stream=True)) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break
        assert fake.active_streams == 1
        closed_at = time.monotonic()
    noticed = await fake.wait_for_disconnect(timeout=1)

    assert closed_at <= noticed < closed_at + 0.1
    await asyncio.sleep(0.01)
    assert fake.active_streams == 0  # it stopped writing at once
    assert fake.disconnects == [noticed]


@pytest.mark.parametrize(
    "scenario", [Scenario(stall_after=2), Scenario(delay=5), Scenario(keepalives=3, keepalive_interval=5)]
)
async def test_client_leaving_a_stall_or_a_wait_is_noticed(fake: FakeUpstream, scenario: Scenario) -> None:
    fake.scenario = scenario
    async with httpx.AsyncClient(base_url=fake.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/chat/completions", json=chat(stream=True), timeout=0.2)
    noticed = await fake.wait_for_disconnect(timeout=1)
    assert started + 0.2 <= noticed < started + 0.5


async def test_disconnect_after_cuts_the_stream(fake: FakeUpstream, client: httpx.AsyncClient) -> None:
    fake.scenario = Scenario(disconnect_after=3)
    received: list[str] = []

    async def read() -> None:
        async with client.stream("POST", "/chat/completions", json=chat(stream=True)) as response:
            async for line in response.aiter_lines():
                received.append(line)

    with pytest.raises(httpx.RemoteProtocolError):
        await read()
    assert [line for line in received if line.startswith("data: ")][-1] != "data: [DONE]"
    assert len([line for line in received if line.startswith("data: ")]) == 3

    raw = await raw_exchange(fake, post_bytes(chat(stream=True)))
    assert b"[DONE]" not in raw
    assert not raw.endswith(b"0\r\n\r\n")
    assert raw.count(b"data: ") == 3
    assert fake.disconnects == []  # the fake cut it: not a client going away


async def test_disconnect_after_truncates_a_json_answer(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.scenario = Scenario(disconnect_after=0)
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/chat/completions", json=chat())


async def test_malformed_event_then_the_stream_goes_on(fake: FakeUpstream, client: httpx.AsyncClient) -> None:
    fake.scenario = Scenario(malformed_after=2, tokens=3, reasoning_tokens=0)
    found = events((await client.post("/chat/completions", json=chat(stream=True))).text)
    assert found[2] == 'data: {"id": oops not json'
    assert found[-1] == "data: [DONE]"
    assert len(found) == 1 + 3 + 1 + 1 + 1


async def test_active_streams_counts_concurrent_answers(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.scenario = Scenario(tokens=3, reasoning_tokens=0, token_delay=0.05)
    tasks = [asyncio.create_task(client.post("/chat/completions", json=chat(stream=True))) for _ in range(3)]
    await asyncio.sleep(0.08)
    assert fake.active_streams == 3
    await asyncio.gather(*tasks)
    assert fake.active_streams == 0
    assert fake.connections == 3


async def test_stop_ends_stalled_answers_and_idle_connections() -> None:
    fake = FakeUpstream()
    await fake.start()
    fake.scenario = Scenario(stall_after=1)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with (
        httpx.AsyncClient(base_url=fake.url, headers=headers) as idle,
        httpx.AsyncClient(base_url=fake.url, headers=headers) as busy,
    ):
        assert (await idle.get("/models")).status_code == 200  # leaves an idle keep-alive connection
        async with busy.stream("POST", "/chat/completions", json=chat(stream=True)) as response:
            lines = response.aiter_lines()
            assert (await anext(lines)).startswith("data: ")  # then it stalls
            assert fake.active_streams == 1
            started = time.monotonic()
            await fake.stop()
            assert time.monotonic() - started < 0.5
            with pytest.raises(httpx.RemoteProtocolError):
                await drain(lines)
    assert fake.active_streams == 0
    assert fake.disconnects == []  # the fake going away is not a client leaving
    with pytest.raises(TimeoutError):
        await fake.wait_for_disconnect(timeout=0.05)


# -- models, control endpoints, scripting -------------------------------------------------------------


async def test_models_and_unknown_paths(client: httpx.AsyncClient) -> None:
    for path in ("/models", "/v1/models"):
        listing = (await client.get(path)).json()
        assert listing["object"] == "list"
        assert listing["data"][0] == {"id": "deepseek-v4-flash", "object": "model", "owned_by": "deepseek"}
        assert [m["id"] for m in listing["data"]] == [
            "deepseek-v4-flash",
            "deepseek-v4-pro",
            "deepseek-flash",
            "deepseek-chat",
            "deepseek-reasoner",
        ]
    missing = await client.get("/v2/nothing")
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "Not Found"
    assert (await client.get("/chat/completions")).status_code == 405


async def test_script_then_default_scenario(fake: FakeUpstream, client: httpx.AsyncClient) -> None:
    fake.script(Scenario(status=503), Scenario(content="scripted"))
    fake.scenario = Scenario(content="default")
    first = await client.post("/chat/completions", json=chat())
    second = await client.post("/chat/completions", json=chat())
    third = await client.post("/chat/completions", json=chat())
    assert first.status_code == 503
    assert second.json()["choices"][0]["message"]["content"] == "scripted"
    assert third.json()["choices"][0]["message"]["content"] == "default"


async def test_control_endpoints(fake: FakeUpstream, client: httpx.AsyncClient) -> None:
    # No API key needed: the control endpoints are for the test harness, not the client under test.
    async with httpx.AsyncClient(base_url=fake.url) as control:
        answer = await control.post("/_fake/scenario", json={"content": "from afar", "thinking": False})
        assert answer.status_code == 200
        assert answer.json()["content"] == "from afar"
        assert fake.scenario == Scenario(content="from afar", thinking=False)
        queued = await control.post(
            "/_fake/script", json=[{"status": 429, "retry_after": "1"}, {"tokens": 2, "thinking": False}]
        )
        assert queued.json() == {"queued": 2}
        bad = await control.post("/_fake/scenario", json={"bogus": 1})
        assert bad.status_code == 400
        assert "bogus" in bad.json()["error"]["message"]
        bad = await control.post("/_fake/script", json=[{"usage": "sometimes"}])
        assert bad.status_code == 400

        limited = await client.post("/chat/completions", json=chat("one"))
        short = await client.post("/chat/completions", json=chat("two"))
        default = await client.post("/chat/completions", json=chat("three"))
        assert (limited.status_code, limited.headers["retry-after"]) == (429, "1")
        assert short.json()["usage"]["completion_tokens"] == 2
        assert default.json()["choices"][0]["message"] == {"role": "assistant", "content": "from afar"}

        bodies = (await control.get("/_fake/requests")).json()
        assert bodies == [chat("one"), chat("two"), chat("three")]


# -- real clients ----------------------------------------------------------------------------------------


async def test_openai_sdk_streams_reasoning_content(fake: FakeUpstream) -> None:
    fake.scenario = Scenario(content="Photosynthesis.", reasoning="Plants use light.", keepalives=1)
    sdk = openai.AsyncOpenAI(base_url=fake.url, api_key=KEY, max_retries=0)
    try:
        stream = await sdk.chat.completions.create(
            model="deepseek-v4-flash",
            messages=[{"role": "user", "content": "How do plants make food?"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        reasoning, content, usage = [], [], None
        async for chunk in stream:
            if chunk.choices:
                delta = chunk.choices[0].delta
                reasoning.append(getattr(delta, "reasoning_content", None) or "")
                content.append(delta.content or "")
            usage = chunk.usage or usage
        assert "".join(reasoning) == "Plants use light."
        assert "".join(content) == "Photosynthesis."
        assert usage is not None
        assert usage.completion_tokens == len(split_pieces("Plants use light.")) + 1

        completion = await sdk.chat.completions.create(
            model="deepseek-v4-flash", messages=[{"role": "user", "content": "Again?"}]
        )
        assert completion.choices[0].message.content == "Photosynthesis."

        fake.scenario = Scenario(status=402)
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk.chat.completions.create(
                model="deepseek-v4-flash", messages=[{"role": "user", "content": "x"}]
            )
        assert caught.value.status_code == 402
        assert caught.value.message.endswith("Insufficient Balance")
    finally:
        await sdk.close()
    assert fake.requests[0].path == "/chat/completions"


async def test_history_keeps_the_latest_requests_only() -> None:
    """A fake serving a benchmark keeps a bounded log, newest last, so it does not grow without end."""
    async with FakeUpstream(history=2) as fake, httpx.AsyncClient(base_url=fake.url) as client:
        headers = {"Authorization": f"Bearer {fake.api_key}"}
        for n in range(9):
            response = await client.post("/chat/completions", json=chat(f"message {n}"), headers=headers)
            assert response.status_code == 200
            assert 1 <= len(fake.requests) <= 4
        assert fake.requests[-1].body["messages"][0]["content"] == "message 8"
        assert [r.body["messages"][0]["content"] for r in fake.requests][-2:] == ["message 7", "message 8"]


def test_runs_by_hand() -> None:
    """``python -m core.testing.fake_upstream`` serves until Ctrl-C."""
    port = free_port()
    command = [sys.executable, "-m", "core.testing.fake_upstream", "--port", str(port), "--tokens", "3"]
    command += ["--api-key", "sk-by-hand", "--token-delay", "0"]
    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        command,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as a terminal delivers it: a runner started in the background (`cmd &`)
        # ignores SIGINT, its children inherit that, and Python then never sees the signal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.post(
                    url + "/chat/completions",
                    json=chat(thinking={"type": "disabled"}),
                    headers={"Authorization": "Bearer sk-by-hand"},
                )
                break
            except httpx.TransportError:
                assert process.poll() is None, "the fake did not start"
                assert time.monotonic() < deadline, "the fake did not start in time"
                time.sleep(0.05)
        assert response.json()["usage"]["completion_tokens"] == 3
        process.send_signal(signal.SIGINT)
        try:
            stdout, stderr = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGUSR1)  # the fake prints its stacks, then is killed below
            time.sleep(1)
            process.kill()
            _, stacks = process.communicate()
            pytest.fail(f"the fake did not stop within 10 s of Ctrl-C; its stacks:\n{stacks}")
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert stdout == f"fake DeepSeek listening on {url}\n"
    assert stderr == ""
