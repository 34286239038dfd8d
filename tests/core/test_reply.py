"""The one reply pipeline: gathering a stream's events, and the run from reservation to settlement."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import pytest

from core import Caller, ChatMessage, ChatRequest, ModelConfig, Provider, Route
from core.errors import RateLimited, Unavailable
from core.reply import Gathered, ReplyRun
from core.services.billing import Reservation
from core.tokens import estimate_tokens
from core.types import ContentDelta, Finish, ProviderEvent, ReasoningDelta, ToolCallDelta, Usage
from tests.conftest import settled

REQUEST = ChatRequest(model="scripted", messages=(ChatMessage(role="user", content="Hello"),))


class Scripted(Provider):
    """Yields its script, raising any exception in it where it stands."""

    name = "scripted"

    def __init__(self, script: list[ProviderEvent | BaseException]) -> None:
        super().__init__("scripted", None)
        self.script = script
        self.closed = False

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        try:
            for item in self.script:
                if isinstance(item, BaseException):
                    raise item
                yield item
                await asyncio.sleep(0)
        finally:
            self.closed = True


class Ledger:
    """What a run asks of billing: its settlements."""

    def __init__(self) -> None:
        self.settled: list[tuple[Usage, str]] = []

    async def settle(self, reservation: Reservation, usage: Usage, *, outcome: str, latency_ms: int) -> None:
        assert latency_ms >= 0
        self.settled.append((usage, outcome))


def run_of(script: list[ProviderEvent | BaseException], *, max_output_tokens: int = 100) -> ReplyRun:
    provider = Scripted(script)
    route = Route("scripted", ModelConfig(provider="scripted", max_output_tokens=max_output_tokens), provider)
    reservation = Reservation(entry=None, route=route, prompt_tokens=7)  # type: ignore[arg-type]
    return ReplyRun(Ledger(), route, REQUEST, reservation, started=0.0)  # type: ignore[arg-type]


def test_the_gathered_reply_merges_tool_call_fragments_and_reads_while_growing() -> None:
    gathered = Gathered()
    gathered.add(ReasoningDelta("Think"))
    gathered.add(ContentDelta("Hel"))
    assert (gathered.content, gathered.reasoning) == ("Hel", "Think")  # read mid-way ...
    gathered.add(ContentDelta("lo"))
    gathered.add(ToolCallDelta(0, id="call_1", name="weather"))
    gathered.add(ToolCallDelta(0, arguments='{"city":'))
    gathered.add(ToolCallDelta(0, arguments='"Paris"}'))
    finish = Finish("tool_calls", Usage(prompt_tokens=3, completion_tokens=5))
    gathered.add(finish)
    assert gathered.content == "Hello"  # ... and on
    assert gathered.tool_calls == (
        ToolCallDelta(0, id="call_1", name="weather", arguments='{"city":"Paris"}'),
    )
    assert gathered.finish == finish


def test_the_estimate_charges_the_prompt_only_when_something_was_produced() -> None:
    assert Gathered().estimate(50) == Usage()
    gathered = Gathered()
    gathered.add(ReasoningDelta("Let me think about it"))
    gathered.add(ContentDelta("The sea"))
    gathered.add(ToolCallDelta(0, id="c", name="look", arguments="{}"))
    reasoning = estimate_tokens("Let me think about it")
    produced = reasoning + estimate_tokens("The sea") + estimate_tokens("look{}")
    assert gathered.estimate(50) == Usage(
        prompt_tokens=50, completion_tokens=produced, reasoning_tokens=reasoning
    )


async def test_a_finished_reply_settles_once_at_the_providers_count() -> None:
    finish = Finish("stop", Usage(prompt_tokens=3, completion_tokens=2))
    run = run_of([ContentDelta("Hi"), ContentDelta("!"), finish])
    assert await run.pump() == "complete"
    assert (run.content, run.finish, run.error) == ("Hi!", finish, None)
    await run.settle(run.usage())
    await run.settle(run.usage())
    assert run._billing.settled == [(finish.usage, "complete")]  # type: ignore[attr-defined]


async def test_a_reply_past_its_cap_is_cut_there_and_ends_as_length() -> None:
    run = run_of([ContentDelta("a")] * 10 + [Finish("stop", Usage())], max_output_tokens=3)
    assert await run.pump() == "complete"
    assert run.content == "aaa"
    assert run.finish == Finish("length", Usage(prompt_tokens=7, completion_tokens=3))
    assert run.route.provider.closed  # type: ignore[attr-defined]


async def test_a_provider_error_ends_the_reply_as_an_error_charged_for_what_came() -> None:
    run = run_of([ContentDelta("Half a "), RateLimited("slow down")])
    assert await run.pump() == "error"
    assert isinstance(run.error, RateLimited)
    await run.settle(run.usage())
    usage = Usage(prompt_tokens=7, completion_tokens=estimate_tokens("Half a "))
    assert run._billing.settled == [(usage, "error")]  # type: ignore[attr-defined]


async def test_a_bare_exception_is_logged_and_kept_as_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "chatgate.reply")
    run = run_of([RuntimeError("bug")])
    assert await run.pump() == "error"
    assert isinstance(run.error, Unavailable)
    assert "provider 'scripted' failed unexpectedly" in caplog.text
    await run.settle(run.usage())
    assert run._billing.settled == [(Usage(), "error")]  # type: ignore[attr-defined]  # nothing produced


async def test_a_stream_that_ends_unfinished_is_unavailable() -> None:
    run = run_of([ContentDelta("Hi")])
    assert await run.pump() == "error"
    assert isinstance(run.error, Unavailable)
    assert "without finishing" in run.error.message


async def test_a_cancelled_reply_ends_cancelled_and_its_upstream_is_closed() -> None:
    never, asked_for_more = asyncio.Event(), asyncio.Event()

    class Hanging(Scripted):
        async def stream(self, request: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
            try:
                yield ContentDelta("Once upon")
                asked_for_more.set()  # the first event is gathered: the pump wants the next
                await never.wait()
                yield Finish("stop", Usage())
            finally:
                self.closed = True

    run = run_of([])
    provider = Hanging([])
    run.route = Route("scripted", run.route.config, provider)
    task: asyncio.Task[Any] = asyncio.ensure_future(run.pump())
    await asyncio.wait_for(asked_for_more.wait(), 10)
    task.cancel()
    assert await task == "cancelled"
    assert provider.closed
    assert run.content == "Once upon"
    assert run.usage().completion_tokens == estimate_tokens("Once upon")


async def test_a_completion_cancelled_before_it_starts_is_settled_and_ends(
    write_config: Callable[..., Path], gateway_factory: Callable[..., Any]
) -> None:
    """A client gone before the completion's task first ran: nothing goes upstream, the
    reservation is settled at once, and whoever waits for the result is not left waiting."""
    gateway = await gateway_factory(write_config())
    key, _ = await gateway.services.accounts.create_key("early@example.com")
    await gateway.services.billing.top_up(key.user_id, 10_000_000)
    caller = Caller(await gateway.services.billing.store.get_user(key.user_id), key)
    route = gateway.services.catalog.route("mock-chat")
    request = ChatRequest(model="mock-chat", messages=(ChatMessage(role="user", content="hi"),))
    completion = await gateway.services.completions.start(caller, route, request)
    completion.cancel()  # before the event loop ran its task at all
    await asyncio.wait_for(completion.result(), 10)
    assert completion.end == "cancelled"
    assert completion.content == ""
    entries = await settled(gateway, key.user_id)
    charges = [e for e in entries if e.kind == "charge"]
    assert [(c.outcome, c.amount) for c in charges] == [("cancelled", 0)]
