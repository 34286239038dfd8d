"""One reply, from its reservation to its settlement.

:class:`Gathered` accumulates a provider's events into the reply they make (text,
reasoning, tool calls, finish) and estimates what a reply that did not finish cost.
:class:`ReplyRun` is the sequence every billed reply goes through, written once for
the stateless ``/v1`` completions and for stored replies: read the stream, cut it
where it passes the output tokens reserved for it, gather it, classify how it ended,
and settle the reservation exactly once. Each kind of reply subclasses it and adds
only what is its own in :meth:`ReplyRun._publish` (a queue for its reader, or
followers and persistence).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

import msgspec

from .errors import ProviderError, Unavailable
from .tokens import OutputMeter, estimate_prompt_tokens, estimate_tokens
from .types import ChatRequest, ContentDelta, Finish, ProviderEvent, ReasoningDelta, ToolCallDelta, Usage

if TYPE_CHECKING:
    from .services.billing import Billing, Reservation
    from .services.catalog import Route

End = Literal["complete", "cancelled", "error"]
"""How a reply ended: with its finish (or cut at its cap), stopped by its consumer, or failed."""


class Reply(msgspec.Struct, frozen=True):
    """A whole reply, as :func:`core.complete` gathers it from a provider's stream."""

    content: str
    reasoning: str
    tool_calls: tuple[ToolCallDelta, ...]
    finish: Finish


def merge_tool_call(into: ToolCallDelta | None, part: ToolCallDelta) -> ToolCallDelta:
    """Fold one streamed tool-call fragment into the call gathered so far."""
    if into is None:
        return part
    return ToolCallDelta(
        index=into.index,
        id=into.id or part.id,
        name=into.name or part.name,
        arguments=into.arguments + part.arguments,
    )


def _joined(parts: list[str]) -> str:
    # Reading collapses the pieces into one, so a reply read while it grows (a
    # transcript, a flush) joins only what arrived since, and adding stays an append.
    if len(parts) == 1:
        return parts[0]
    text = "".join(parts)
    parts.clear()
    parts.append(text)
    return text


class Gathered:
    """The reply a stream of events has made so far.

    Promises: :meth:`add` takes the events in order, one append each (no copy of what
    came before); :attr:`content` and :attr:`reasoning` are the texts so far, and
    :attr:`tool_calls` the calls with their fragments merged, by index; :attr:`finish`
    is the finish event once it came.
    """

    __slots__ = ("_calls", "_content", "_reasoning", "finish")

    def __init__(self) -> None:
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._calls: dict[int, ToolCallDelta] = {}
        self.finish: Finish | None = None

    def add(self, event: ProviderEvent) -> None:
        """Gather one event."""
        match event:
            case ContentDelta(text=text):
                self._content.append(text)
            case ReasoningDelta(text=text):
                self._reasoning.append(text)
            case ToolCallDelta() as part:
                self._calls[part.index] = merge_tool_call(self._calls.get(part.index), part)
            case Finish():
                self.finish = event

    @property
    def content(self) -> str:
        return _joined(self._content)

    @property
    def reasoning(self) -> str:
        return _joined(self._reasoning)

    @property
    def tool_calls(self) -> tuple[ToolCallDelta, ...]:
        return tuple(self._calls.values())

    def estimate(self, prompt_tokens: int) -> Usage:
        """The usage of a reply that ended without the provider's count: what it produced
        (text, reasoning, tool calls), and ``prompt_tokens`` if it produced anything (a
        request that failed before it did is charged nothing)."""
        reasoning = estimate_tokens(self.reasoning)
        produced = estimate_tokens(self.content) + reasoning
        for call in self._calls.values():
            produced += estimate_tokens((call.name or "") + call.arguments)
        return Usage(
            prompt_tokens=prompt_tokens if produced else 0,
            completion_tokens=produced,
            reasoning_tokens=reasoning,
        )


class Source(Protocol):
    """A reply stream whose request was sent elsewhere (``core.services.generations.Upstream``)."""

    def events(self) -> AsyncIterator[ProviderEvent]: ...

    async def aclose(self) -> None: ...


class ReplyRun:
    """One billed reply: reads its stream, gathers it, and settles its reservation.

    Promises:
        * every event the stream yields within the reply's cap is gathered and then
          passed to :meth:`_publish`, in order; no more than that per event;
        * a reply that passes the output tokens reserved for it (an upstream that
          ignores ``max_tokens``) stops there, the upstream closed, and ends with a
          ``length`` finish, as long as the cap;
        * :meth:`pump` closes the upstream and returns how the reply ended
          (:data:`End`, also :attr:`end`), never raising: a cancelled reply is
          ``cancelled``; a :class:`~core.errors.ProviderError` is kept in
          :attr:`error`, and any other exception is logged and kept as one
          (:meth:`_unexpected`);
        * :meth:`settle` settles the reservation at most once, for :meth:`usage`
          (the provider's count, or an estimate of what was produced), with the
          ledger outcome :attr:`outcomes` names and the latency since ``started``.

    A subclass may set :attr:`outcomes`, :attr:`log` and :attr:`require_finish`.
    """

    outcomes: ClassVar[Mapping[End, str]] = {
        "complete": "complete",
        "cancelled": "cancelled",
        "error": "error",
    }
    """The ledger outcome of each way a reply can end."""
    require_finish: ClassVar[bool] = True
    """Whether a stream that ends without a finish event is an error (``Unavailable``)."""
    log: ClassVar[logging.Logger] = logging.getLogger("chatgate.reply")

    def __init__(
        self,
        billing: Billing,
        route: Route,
        request: ChatRequest,
        reservation: Reservation | None,
        started: float,
    ) -> None:
        self.route = route
        self.request = request
        self.reservation = reservation
        self.started = started
        """When the request went upstream (``time.monotonic()``): the settlement's latency starts here."""
        self.gathered = Gathered()
        self.end: End | None = None
        self.error: ProviderError | None = None
        self._billing = billing
        self._settled = False

    @property
    def content(self) -> str:
        return self.gathered.content

    @property
    def reasoning(self) -> str:
        return self.gathered.reasoning

    @property
    def tool_calls(self) -> tuple[ToolCallDelta, ...]:
        return self.gathered.tool_calls

    @property
    def finish(self) -> Finish | None:
        return self.gathered.finish

    @property
    def prompt_tokens(self) -> int:
        """The prompt as estimated when the reply was admitted (a cut or unfinished reply's)."""
        if self.reservation is not None:
            return self.reservation.prompt_tokens
        return estimate_prompt_tokens(self.request.messages)

    def usage(self) -> Usage:
        """What the reply used: the provider's count if it finished, else an estimate."""
        finish = self.gathered.finish
        return finish.usage if finish is not None else self.gathered.estimate(self.prompt_tokens)

    def _publish(self, event: ProviderEvent) -> None:
        """Pass an event on once it is gathered (per token: keep it cheap)."""

    def _unexpected(self, exc: Exception) -> ProviderError:
        """The error a provider that raised something other than a ``ProviderError`` failed with."""
        return Unavailable(f"internal error in provider: {type(exc).__name__}")

    async def pump(self, upstream: Source | None = None) -> End:
        """Read the reply to its end (see the class's promises); ``upstream``: the request
        already sent, else it is sent here."""
        end: End = "complete"
        gathered = self.gathered
        add, publish = gathered.add, self._publish
        meter = OutputMeter(self.route.output_tokens(self.request))
        try:
            if upstream is None:
                stream = self.route.stream(self.request)
                events: AsyncIterator[ProviderEvent] = stream
                close = stream.aclose
            else:
                events, close = upstream.events(), upstream.aclose
            try:
                async for event in events:
                    if (admitted := meter.admit(event)) is None:
                        break
                    add(admitted)
                    publish(admitted)
                    if meter.over:
                        break
            finally:
                await close()
            instance = self.route.provider.instance
            if meter.over:  # the upstream is closed: what it would have sent past the cap is not read
                finish = meter.cut(self.prompt_tokens, instance, self.route.model)
                add(finish)
                publish(finish)
            elif gathered.finish is None and self.require_finish:
                raise Unavailable(f"provider {instance!r} ended the reply without finishing it")
        except asyncio.CancelledError:
            end = "cancelled"  # not re-raised: the caller owns the bookkeeping, which must follow
        except ProviderError as exc:
            end, self.error = "error", exc
        except Exception as exc:  # a provider breaking its contract must not lose the money
            self.log.exception("provider %r failed unexpectedly", self.route.provider.instance)
            end, self.error = "error", self._unexpected(exc)
        self.end = end
        return end

    async def settle(self, usage: Usage) -> None:
        """Settle the reservation for ``usage``, once (later calls, or no reservation: nothing).

        Call it after :meth:`pump` returned. Raises what the settlement raised.
        """
        assert self.end is not None, "a reply settles once it has ended"
        if self.reservation is None or self._settled:
            return
        self._settled = True
        outcome = self.outcomes[self.end]
        latency_ms = round((time.monotonic() - self.started) * 1000)
        await self._billing.settle(self.reservation, usage, outcome=outcome, latency_ms=latency_ms)
