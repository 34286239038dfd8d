"""The chat surface's ``chat.completion.chunk`` rendering of provider events, shared by the
one-choice stream (:mod:`.endpoint`) and the several-choice one (:mod:`.choices`)."""

from __future__ import annotations

from typing import Any

from core import Completion, ContentDelta, Finish, ProviderEvent, ReasoningDelta, ToolCallDelta

from . import wire


def render(
    reply: wire.Reply,
    event: ProviderEvent,
    usage: bool,
    *,
    index: int = 0,
    logprobs: bool = False,
    usage_chunk: bool = True,
) -> bytes:
    """One provider event as ``chat.completion.chunk`` events of choice ``index``.

    ``logprobs``: the client asked for them (content chunks carry the event's entries);
    ``usage_chunk`` False leaves the trailing usage chunk to the caller (several choices).
    """
    fingerprint = event.system_fingerprint
    if fingerprint is not None and fingerprint != reply.fingerprint:
        reply.saw(fingerprint)
    match event:
        case ContentDelta(text=text):
            asked = wire.logprobs_body(event.logprobs) if logprobs else None
            return wire.chunk(reply, {"content": text}, usage=usage, index=index, logprobs=asked)
        case ReasoningDelta(text=text):
            return wire.chunk(reply, {"reasoning_content": text}, usage=usage, index=index)
        case ToolCallDelta() as part:
            return wire.chunk(reply, {"tool_calls": [wire.tool_call_delta(part)]}, usage=usage, index=index)
        case Finish(reason=reason, usage=counted):
            end = wire.chunk(reply, {}, reason, usage=usage, index=index)
            return end + wire.usage_chunk(reply, counted) if usage and usage_chunk else end
    # Unreachable by the types; an event of another kind from a third-party provider is skipped.
    return b""  # type: ignore[unreachable]


def opening(reply: wire.Reply, parsed: wire.Parsed, index: int = 0) -> bytes:
    """The first chunk of choice ``index``: the assistant's role (and empty logprobs, when asked)."""
    logprobs = wire.NO_LOGPROBS if parsed.logprobs else None
    delta = {"role": "assistant", "content": ""}
    return wire.chunk(reply, delta, usage=parsed.include_usage, index=index, logprobs=logprobs)


def whole_extras(completion: Completion, logprobs: bool) -> tuple[str | None, dict[str, Any] | None]:
    """A finished reply's ``system_fingerprint`` and its ``logprobs`` object (None when not asked).

    A whole reply's events are still queued (nobody read them), so they are where its content
    tokens' logprob entries are.
    """
    fingerprint = completion.finish.system_fingerprint if completion.finish is not None else None
    # A provider may name its fingerprint on the first event only: look there too.
    events = completion.ready_events() if logprobs or fingerprint is None else []
    entries: list[dict[str, Any]] = []
    for event in events:
        fingerprint = fingerprint or event.system_fingerprint
        if isinstance(event, ContentDelta) and event.logprobs:
            entries.extend(event.logprobs)
    return fingerprint, wire.logprobs_body(entries) if logprobs else None


def cancel_all(completions: list[Completion]) -> None:
    """Stop every choice (the client is gone); what each produced is still charged."""
    for completion in completions:
        completion.cancel()


def waive_all(completions: list[Completion]) -> None:
    """The client gets an error status for the whole reply: stop every choice, none charged."""
    for completion in completions:
        completion.waive()


def charge_all(completions: list[Completion]) -> None:
    """Settle every choice not waived for what it produced (something of the reply was delivered,
    or the client left)."""
    for completion in completions:
        completion.charge()
