"""Upstream misbehaviour the provider must survive, each shown over real HTTP.

Most cases run against the fake DeepSeek server; bytes no DeepSeek would send
(compressed streams, nested garbage, a body held open after ``[DONE]``) come
from ``RawUpstream``, a loopback server that writes exactly what a test gives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Any

import msgspec
import pytest

from core.errors import BadRequest, Timeout, Unavailable
from core.testing.fake_upstream import FakeUpstream
from core.types import ChatMessage, ChatRequest, ContentDelta, Finish, ProviderEvent, ToolCall
from providers.deepseek import DeepSeekProvider
from providers.openai_compatible import OpenAICompatibleProvider
from tests.conftest import FAKE_DEEPSEEK_KEY

Step = tuple[float, bytes]  # seconds to wait, then bytes to write


def chunk(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def delta(text: str, **extra: Any) -> bytes:
    return chunk({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}], **extra})


USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
FINISH = chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": USAGE})
DONE = b"data: [DONE]\n\n"


class RawUpstream:
    """Answers every request with a 200 whose headers and body bytes the test chose."""

    def __init__(self, steps: Sequence[Step], *, headers: dict[str, str] | None = None, close: bool = True):
        self.steps = steps
        self.headers = {"Content-Type": "text/event-stream", **(headers or {})}
        self.close = close  # end the body; otherwise hold it open until the client goes
        self.url = ""
        self.requests: list[dict[str, str]] = []

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RawUpstream]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")[1:]
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
            self.requests.append(headers)
            await reader.readexactly(int(headers.get("content-length", "0")))
            response = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
            response += "".join(f"{k}: {v}\r\n" for k, v in self.headers.items()) + "\r\n"
            writer.write(response.encode())
            for wait, data in self.steps:
                await asyncio.sleep(wait)
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                await writer.drain()
            if self.close:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            await reader.read()  # until the client closes
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def provider_for(url: str, cls: type[OpenAICompatibleProvider] = DeepSeekProvider, **options: Any) -> Any:
    settings = {"base_url": url, "api_key": FAKE_DEEPSEEK_KEY, "backoff": 0.01, **options}
    return cls("upstream", msgspec.convert(settings, cls.Options))


async def run(provider: OpenAICompatibleProvider, request: ChatRequest, into: list | None = None) -> list:
    events: list[ProviderEvent] = [] if into is None else into
    await provider.open()
    try:
        async with asyncio.timeout(10), aclosing(provider.stream(request)) as stream:
            async for event in stream:
                events.append(event)
    finally:
        await provider.aclose()
    return events


def ask(model: str = "deepseek-v4-flash", messages: tuple[ChatMessage, ...] | None = None) -> ChatRequest:
    return ChatRequest(model=model, messages=messages or (ChatMessage(role="user", content="Hi"),))


CALL = ToolCall(id="call_00_abc", name="weather", arguments='{"location": "SF"}')
AFTER_A_TOOL_CALL = (
    ChatMessage(role="user", content="Hello"),
    ChatMessage(role="assistant", content="Hi!", reasoning="Greet."),
    ChatMessage(role="user", content="Weather in SF?"),
    ChatMessage(role="assistant", content=None, reasoning="Use the tool.", tool_calls=(CALL,)),
    ChatMessage(role="tool", content='{"temp": 18}', tool_call_id="call_00_abc"),
    ChatMessage(role="assistant", content="It is 18 C.", reasoning="Report it."),
    ChatMessage(role="user", content="Thanks. And tomorrow?"),
)


async def test_reasoning_goes_back_on_every_assistant_turn_once_a_tool_was_called(
    fake_deepseek: FakeUpstream,
) -> None:
    # The fake answers 400 in thinking mode when any of them lacks it, as DeepSeek V4 does.
    events = await run(provider_for(fake_deepseek.url), ask(messages=AFTER_A_TOOL_CALL))
    assert isinstance(events[-1], Finish)
    sent = fake_deepseek.requests[-1].body["messages"]
    assert [m.get("reasoning_content") for m in sent] == [
        None,
        None,
        None,
        "Use the tool.",
        None,
        "Report it.",
        None,
    ]


async def test_openai_compatible_servers_never_get_reasoning_content(fake_deepseek: FakeUpstream) -> None:
    # Some OpenAI-compatible servers reject the unknown field with a 400.
    fake_deepseek.scenario = msgspec.convert({"thinking": False}, type(fake_deepseek.scenario))
    await run(provider_for(fake_deepseek.url, OpenAICompatibleProvider), ask(messages=AFTER_A_TOOL_CALL))
    sent = fake_deepseek.requests[-1].body["messages"]
    assert not any("reasoning_content" in m for m in sent)


async def test_a_key_read_with_a_line_ending_is_stripped_not_leaked(fake_deepseek: FakeUpstream) -> None:
    events = await run(provider_for(fake_deepseek.url, api_key=FAKE_DEEPSEEK_KEY + "\r\n"), ask())
    assert isinstance(events[-1], Finish)
    assert fake_deepseek.requests[-1].headers["authorization"] == f"Bearer {FAKE_DEEPSEEK_KEY}"
    with pytest.raises(msgspec.ValidationError, match="control characters"):
        provider_for(fake_deepseek.url, api_key="sk-abc\ndef")


async def test_the_provider_asks_for_an_uncompressed_stream_and_reads_a_compressed_one() -> None:
    body = gzip.compress(delta("Hel") + delta("lo") + FINISH + DONE)
    upstream = RawUpstream([(0, body)], headers={"Content-Encoding": "gzip"})
    async with upstream.running():
        events = await run(provider_for(upstream.url), ask())
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "Hello"
    assert upstream.requests[0]["accept-encoding"] == "identity"


async def test_usage_without_counts_is_estimated_not_free() -> None:
    null_usage = {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None}
    finish = chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": null_usage})
    upstream = RawUpstream([(0, delta("Hello there") + finish + DONE)])
    async with upstream.running():
        events = await run(provider_for(upstream.url), ask())
    usage = events[-1].usage
    assert usage.extra == {"estimated": True}
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0


async def test_integral_float_counts_are_accepted() -> None:
    finish = chunk(
        {
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5.0, "completion_tokens": 2.0},
        }
    )
    upstream = RawUpstream([(0, delta("Hi") + finish + DONE)])
    async with upstream.running():
        events = await run(provider_for(upstream.url), ask())
    assert (events[-1].usage.prompt_tokens, events[-1].usage.completion_tokens) == (5, 2)


async def test_deeply_nested_garbage_is_a_typed_error() -> None:
    upstream = RawUpstream([(0, delta("Hi") + b'data: {"error": ' + b"[" * 5000 + b"\n\n")])
    async with upstream.running():
        with pytest.raises(Unavailable, match="not a chat-completion chunk"):
            await run(provider_for(upstream.url), ask())


async def test_a_body_held_open_after_done_does_not_delay_the_finish() -> None:
    upstream = RawUpstream([(0, delta("Hi") + FINISH + DONE)], close=False)
    async with upstream.running():
        started = time.monotonic()
        events = await run(provider_for(upstream.url), ask())
    assert isinstance(events[-1], Finish)
    assert time.monotonic() - started < 0.5


async def test_keep_alive_comments_after_the_first_token_do_not_hold_off_the_idle_timeout() -> None:
    upstream = RawUpstream([(0, delta("Hi")), *[(0.05, b": keep-alive\n\n")] * 40])
    events: list[ProviderEvent] = []
    async with upstream.running():
        started = time.monotonic()
        with pytest.raises(Timeout, match="stalled"):
            await run(provider_for(upstream.url, idle_timeout=0.2), ask(), into=events)
    assert time.monotonic() - started < 1.0
    assert len(events) == 1


async def test_an_in_stream_error_keeps_its_status() -> None:
    error = {"error": {"message": "temperature must be <= 2", "type": "BadRequestError", "code": 400}}
    upstream = RawUpstream([(0, chunk(error))])
    async with upstream.running():
        with pytest.raises(BadRequest, match="temperature must be <= 2"):
            await run(provider_for(upstream.url, max_retries=3), ask())
    assert len(upstream.requests) == 1  # a request-shaped error is not retried


async def test_a_pending_cancellation_does_not_turn_a_timeout_into_an_interrupt(
    fake_deepseek: FakeUpstream,
) -> None:
    fake_deepseek.scenario = msgspec.convert({"stall_after": 2}, type(fake_deepseek.scenario))
    provider = provider_for(fake_deepseek.url, idle_timeout=0.2)

    async def swallowed_a_cancel_then_streams() -> BaseException | None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):  # swallowed without uncancel(), as some
            await asyncio.sleep(0)  # frameworks do: cancelling() stays 1
        try:
            await run(provider, ask())
        except Timeout as exc:
            return exc
        return None

    assert isinstance(await asyncio.create_task(swallowed_a_cancel_then_streams()), Timeout)
