"""The conformance suite every provider plugin passes.

Subclass :class:`ProviderConformance` in a test module and supply a model,
an opened provider, and a way to make it fail::

    class TestMyProviderConformance(ProviderConformance):
        model = "my-model"              # or a fixture named ``model``
        secret = "sk-test-key"          # the credential it is configured with, if any

        @pytest_asyncio.fixture
        async def provider(self):
            provider = MyProvider("mine", MyProvider.Options(api_key=self.secret, ...))
            await provider.open()
            yield provider
            await provider.aclose()

        @pytest.fixture
        def failing(self):
            @contextlib.asynccontextmanager
            async def make(kind):       # kind: a key of core.errors.PROVIDER_ERRORS
                ...                     # an opened provider whose upstream fails that way
                yield provider
            return make

        async def upstream_streams(self, provider):
            return ...                  # upstream requests open now (optional)

A provider that cannot fail in some of those ways (one with no upstream, say)
names them in ``cannot_fail`` with the reason, and their tests are skipped
with it; one that cannot fail at all needs no ``failing`` fixture::

        cannot_fail = dict.fromkeys(PROVIDER_ERRORS, "echo has no upstream to fail")

The tests only rely on :class:`core.Provider`'s documented promises,
so a provider backed by a fake or recorded upstream passes them offline: an
HTTP provider can run them against :mod:`core.testing.fake_upstream`, the way
``tests/providers/test_deepseek.py`` does, and ``examples/chatgate-echo``
shows a provider package running them in its own tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, aclosing
from typing import Any, ClassVar

import msgspec
import pytest

from core import (
    PROVIDER_ERRORS,
    ChatMessage,
    ChatRequest,
    ContentDelta,
    Finish,
    Provider,
    ProviderError,
    ProviderEvent,
    ReasoningDelta,
    ToolCallDelta,
    complete,
)

EVENT_TYPES = (ContentDelta, ReasoningDelta, ToolCallDelta, Finish)
DELTA_TYPES = (ContentDelta, ReasoningDelta, ToolCallDelta)


def as_generator(events: AsyncIterator[ProviderEvent]) -> AsyncGenerator[ProviderEvent, None]:
    """``events``, checked to be an async generator: the contract requires one, so it can be closed."""
    assert isinstance(events, AsyncGenerator), "Provider.stream must be an async generator"
    return events


class ProviderConformance:
    """Tests of the contract of :meth:`core.Provider.stream`.

    Promises checked: a stream yields only provider events, at least one
    content delta and exactly one :class:`~core.types.Finish`, last, with
    non-zero usage; :func:`core.provider.complete` gathers the same text;
    closing the stream or cancelling its consumer stops it promptly, and
    with it the upstream request; ``max_tokens`` bounds the reply; each kind
    of upstream failure raises its :class:`~core.errors.ProviderError`
    subclass; and the configured ``secret`` appears in no error message and
    not in ``describe()``.

    A request that does not stream (``ChatRequest.stream`` False) must keep
    the same promises.

    A subclass provides a fixture ``provider`` (an opened instance, closed
    after the test), ``model``, a model it serves, as a class attribute or
    a fixture, and a fixture ``failing`` for the failure kinds it does not
    name in ``cannot_fail``. The other class attributes tune the suite for
    slow upstreams.
    """

    secret: ClassVar[str | None] = None
    """The credential the provider under test is configured with (None: it has none)."""

    cannot_fail: ClassVar[Mapping[str, str]] = {}
    """Failure kinds (keys of :data:`core.errors.PROVIDER_ERRORS`) the provider cannot produce,
    each with the reason; their tests are skipped, giving it."""

    prompt: ClassVar[str] = "Explain in three sentences why the sky is blue."
    """A prompt whose honest answer is much longer than ``max_tokens_bound`` tokens."""

    max_tokens_bound: ClassVar[int] = 4
    """The most completion tokens accepted for ``max_tokens=1``.

    Upstreams honour ``max_tokens`` exactly, but some count an end-of-turn or
    special token on top; a few tokens of slack keep the test about "stops
    early" rather than exact accounting. A provider that ignores
    ``max_tokens`` still fails, because the reply to ``prompt`` is longer.
    """

    prompt_timeout: ClassVar[float] = 30.0
    """Seconds a whole stream may take before the test fails instead of hanging."""

    promptly: ClassVar[float] = 2.0
    """Seconds within which a closed or cancelled stream must have stopped."""

    @pytest.fixture
    def served_model(self, request: pytest.FixtureRequest) -> str:
        """The model under test: the class attribute ``model``, or else the fixture ``model``."""
        value = getattr(self, "model", None)
        if isinstance(value, str):
            return value
        model = request.getfixturevalue("model")
        assert isinstance(model, str), "the fixture `model` must return a model name"
        return model

    @pytest.fixture
    def failing(self) -> Callable[[str], AbstractAsyncContextManager[Provider]]:
        """A factory: ``async with failing(kind) as provider`` gives an opened provider whose
        upstream fails with ``kind``, a key of :data:`core.errors.PROVIDER_ERRORS`.

        Called only for the kinds not in ``cannot_fail``.
        """

        def undeclared(kind: str) -> AbstractAsyncContextManager[Provider]:
            raise NotImplementedError(
                f"override the `failing` fixture to make the provider fail with {kind!r}, "
                f"or name {kind!r} in `cannot_fail` with the reason it cannot"
            )

        return undeclared

    async def upstream_streams(self, provider: Provider) -> int | None:
        """Upstream requests open right now, when the test can see them (None: it cannot)."""
        return None

    def assert_no_secret(self, text: str) -> None:
        if self.secret:
            # A piece of a key gives it away too (upstreams echo "sk-abc***wxyz" back).
            size = min(6, len(self.secret))
            pieces = {self.secret[i : i + size] for i in range(len(self.secret) - size + 1)}
            assert not any(piece in text for piece in pieces), "the provider's secret (or a piece) leaked"

    def chat_request(self, model: str, **fields: Any) -> ChatRequest:
        """The request the tests send; ``fields`` override sampling parameters."""
        return ChatRequest(model=model, messages=(ChatMessage(role="user", content=self.prompt),), **fields)

    async def collect(self, provider: Provider, request: ChatRequest) -> list[ProviderEvent]:
        """Every event of one stream, read to its end."""
        async with (
            asyncio.timeout(self.prompt_timeout),
            aclosing(as_generator(provider.stream(request))) as events,
        ):
            return [event async for event in events]

    @pytest.mark.asyncio
    @pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
    async def test_stream_yields_deltas_then_exactly_one_finish(
        self, provider: Provider, served_model: str, stream: bool
    ) -> None:
        events = await self.collect(provider, self.chat_request(served_model, stream=stream))
        strays = [e for e in events if not isinstance(e, EVENT_TYPES)]
        assert not strays, f"stream yielded non-event values: {strays!r}"
        assert any(isinstance(e, ContentDelta) for e in events), "stream yielded no ContentDelta"
        assert sum(isinstance(e, Finish) for e in events) == 1, "stream must yield exactly one Finish"
        assert isinstance(events[-1], Finish), "Finish must be the last event"

    @pytest.mark.asyncio
    @pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
    async def test_finish_reports_usage(self, provider: Provider, served_model: str, stream: bool) -> None:
        events = await self.collect(provider, self.chat_request(served_model, stream=stream))
        finish = events[-1]
        assert isinstance(finish, Finish)
        assert finish.usage.prompt_tokens > 0
        assert finish.usage.completion_tokens > 0
        # completion_tokens includes reasoning_tokens (see core.types.Usage).
        assert 0 <= finish.usage.reasoning_tokens <= finish.usage.completion_tokens

    @pytest.mark.asyncio
    async def test_complete_gathers_what_the_stream_yields(
        self, provider: Provider, served_model: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Record the very stream complete() reads, so the test does not assume
        # the provider answers the same request twice in the same way.
        recorded: list[ProviderEvent] = []
        stream = provider.stream

        async def recording(request: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
            async with aclosing(as_generator(stream(request))) as events:
                async for event in events:
                    recorded.append(event)
                    yield event

        monkeypatch.setattr(provider, "stream", recording)
        async with asyncio.timeout(self.prompt_timeout):
            completion = await complete(provider, self.chat_request(served_model))
        streamed = "".join(e.text for e in recorded if isinstance(e, ContentDelta))
        reasoned = "".join(e.text for e in recorded if isinstance(e, ReasoningDelta))
        assert completion.content == streamed
        assert completion.content, "the reply is empty"
        assert completion.reasoning == reasoned
        assert completion.finish == recorded[-1]

    @pytest.mark.asyncio
    async def test_closing_early_stops_the_stream(self, provider: Provider, served_model: str) -> None:
        events = as_generator(provider.stream(self.chat_request(served_model)))
        seen_delta = False
        async with asyncio.timeout(self.prompt_timeout) as deadline, aclosing(events):
            async for event in events:
                if isinstance(event, DELTA_TYPES):
                    seen_delta = True
                    break
            # Only the close is left, and it must be prompt (TimeoutError otherwise).
            deadline.reschedule(asyncio.get_running_loop().time() + self.promptly)
        assert seen_delta, "stream ended without a delta"
        with pytest.raises(StopAsyncIteration):
            await anext(events)
        await self.assert_upstream_stops(provider)

    async def assert_upstream_stops(self, provider: Provider) -> None:
        """Wait (at most ``promptly``) until the upstream request is gone, where that is observable."""
        async with asyncio.timeout(self.promptly):
            while await self.upstream_streams(provider):  # noqa: ASYNC110 - the count is all it exposes
                await asyncio.sleep(0.005)

    @pytest.mark.asyncio
    async def test_cancelling_the_consumer_stops_the_stream(
        self, provider: Provider, served_model: str
    ) -> None:
        first_delta = asyncio.Event()
        events = as_generator(provider.stream(self.chat_request(served_model)))

        async def consume() -> None:
            async with aclosing(events):
                async for event in events:
                    if isinstance(event, DELTA_TYPES):
                        first_delta.set()
            # A provider that never waits runs to its end before cancel() can
            # land; park so the task is still there to cancel. Any provider
            # that waits (for the network, say) is cancelled inside its stream.
            await asyncio.Event().wait()

        task = asyncio.create_task(consume())
        try:
            async with asyncio.timeout(self.prompt_timeout):
                await first_delta.wait()
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=self.promptly)
            assert task in done, f"the consuming task did not stop within {self.promptly} s of cancel()"
            assert task.cancelled(), "the consuming task must end with CancelledError"
        finally:
            task.cancel()
        with pytest.raises(StopAsyncIteration):
            await anext(events)
        await self.assert_upstream_stops(provider)

    @pytest.mark.asyncio
    async def test_max_tokens_stops_the_reply(self, provider: Provider, served_model: str) -> None:
        events = await self.collect(provider, self.chat_request(served_model, max_tokens=1))
        finish = events[-1]
        assert isinstance(finish, Finish)
        assert finish.reason in ("length", "stop")
        assert finish.usage.completion_tokens <= self.max_tokens_bound

    @pytest.mark.asyncio
    @pytest.mark.parametrize("kind", sorted(PROVIDER_ERRORS))
    async def test_failures_raise_typed_errors(
        self,
        failing: Callable[[str], AbstractAsyncContextManager[Provider]],
        served_model: str,
        kind: str,
    ) -> None:
        if kind in self.cannot_fail:
            pytest.skip(self.cannot_fail[kind])
        async with failing(kind) as provider:
            with pytest.raises(ProviderError) as caught:
                await self.collect(provider, self.chat_request(served_model))
        error = caught.value
        assert isinstance(error, PROVIDER_ERRORS[kind]), f"{kind}: raised {type(error).__name__}: {error}"
        assert str(error), "the error has no message"
        self.assert_no_secret(str(error))
        self.assert_no_secret(repr(error.args))

    def test_cannot_fail_names_failure_kinds_with_reasons(self) -> None:
        unknown = sorted(set(self.cannot_fail) - set(PROVIDER_ERRORS))
        assert not unknown, f"cannot_fail names {unknown}; the failure kinds are {sorted(PROVIDER_ERRORS)}"
        unexplained = sorted(kind for kind, reason in self.cannot_fail.items() if not reason.strip())
        assert not unexplained, f"cannot_fail gives no reason for {unexplained}"

    @pytest.mark.asyncio
    async def test_describe_keeps_the_secret_out(self, provider: Provider) -> None:
        description = provider.describe()
        assert isinstance(description, dict)
        self.assert_no_secret(msgspec.json.encode(description).decode())
