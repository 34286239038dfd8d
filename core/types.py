"""Domain types shared by every surface, provider and store.

Surfaces convert their wire formats to and from these; providers consume a
:class:`ChatRequest` and produce a stream of :data:`ProviderEvent`.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

Role = Literal["system", "user", "assistant", "tool"]


class ToolCall(msgspec.Struct, frozen=True, omit_defaults=True):
    """A complete tool call made by the assistant in an earlier turn."""

    id: str
    name: str
    arguments: str
    type: str = "function"


class ChatMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    """One message of a conversation as sent to a provider.

    ``reasoning`` carries an assistant turn's reasoning; providers decide
    whether the upstream wants it back (DeepSeek keeps it on tool-call turns
    only). ``extra`` holds fields a client sent that core does not model.
    """

    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    extra: dict[str, Any] = {}


class ChatRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    """A provider-neutral chat request.

    Sampling parameters left as ``None`` are not sent upstream, so the
    upstream's own defaults apply. ``extra`` is passed through verbatim
    (unknown fields real clients send, provider-specific switches).
    ``stream`` False says the consumer wants only the whole reply: a
    provider may then fetch it in one piece, yielding its events at once.
    A client that names its output limit ``max_completion_tokens`` (OpenAI's
    current field) has it in ``extra``: see :attr:`output_limit`.
    """

    model: str
    messages: tuple[ChatMessage, ...]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: dict[str, Any] | None = None
    tools: tuple[dict[str, Any], ...] | None = None
    tool_choice: str | dict[str, Any] | None = None
    user: str | None = None
    extra: dict[str, Any] = {}
    stream: bool = True

    @property
    def output_limit(self) -> int | None:
        """The most output tokens asked for: the least of ``max_tokens`` and an integer
        ``extra["max_completion_tokens"]``; None when neither is set.

        OpenAI-compatible providers send it as ``max_completion_tokens`` alone when the
        client used that name (OpenAI's reasoning models refuse ``max_tokens``), as
        ``max_tokens`` otherwise.
        """
        named = self.extra.get("max_completion_tokens")
        if not isinstance(named, int) or isinstance(named, bool):
            return self.max_tokens
        return named if self.max_tokens is None else min(named, self.max_tokens)


class Usage(msgspec.Struct, frozen=True, omit_defaults=True):
    """Token usage of one generation.

    ``completion_tokens`` includes ``reasoning_tokens`` (DeepSeek and OpenAI
    both count them so). ``cached_tokens`` are prompt tokens served from the
    upstream's context cache. ``extra`` keeps upstream-specific counters.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    extra: dict[str, Any] = {}

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ContentDelta(msgspec.Struct, frozen=True, tag="content"):
    """A piece of the reply text.

    ``logprobs`` (optional) holds the upstream's per-token log probability entries for this
    piece's tokens, as OpenAI writes them (``{"token", "logprob", "bytes", "top_logprobs"}``),
    passed on as they came; None when none were asked for or the upstream sent none.
    ``system_fingerprint`` (optional, on every event type): the upstream's identifier of the
    backend configuration that produced the reply, when it sent one (see :data:`ProviderEvent`).
    """

    text: str
    logprobs: tuple[dict[str, Any], ...] | None = None
    system_fingerprint: str | None = None


class ReasoningDelta(msgspec.Struct, frozen=True, tag="reasoning"):
    """A piece of the model's reasoning ("think")."""

    text: str
    system_fingerprint: str | None = None


class ToolCallDelta(msgspec.Struct, frozen=True, tag="tool_call", omit_defaults=True):
    """A fragment of a tool call, as OpenAI-style streams deliver them.

    Fragments with the same ``index`` belong to the same call; ``id`` and
    ``name`` arrive on the first fragment, ``arguments`` piecewise.
    """

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    system_fingerprint: str | None = None


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "insufficient_system_resource"]


class Finish(msgspec.Struct, frozen=True, tag="finish"):
    """The last event of every successful stream."""

    reason: FinishReason
    usage: Usage
    system_fingerprint: str | None = None


ProviderEvent = ContentDelta | ReasoningDelta | ToolCallDelta | Finish
"""What a provider's stream yields: deltas, then exactly one :class:`Finish`.

Every event type has an optional ``system_fingerprint`` (default None). A provider whose
upstream reports one sets it at least on the reply's first event and on its
:class:`Finish` (``openai_compatible`` sets it on every event); consumers take the latest
one seen, and one that never saw any invents none. Consumers that ignore it lose nothing.
"""


class EmbeddingRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    """A provider-neutral embeddings request (:meth:`core.Provider.embed`).

    ``inputs`` are texts, or texts already tokenized (token ids), one vector each, in
    order. ``dimensions`` asks for shorter vectors where the model can give them.
    ``extra`` is passed upstream verbatim.
    """

    model: str
    inputs: tuple[str | tuple[int, ...], ...]
    dimensions: int | None = None
    user: str | None = None
    extra: dict[str, Any] = {}


class Embeddings(msgspec.Struct, frozen=True):
    """A provider's answer to an :class:`EmbeddingRequest`: one vector per input, in order,
    and the usage (``prompt_tokens``; ``completion_tokens`` stays 0)."""

    vectors: tuple[tuple[float, ...], ...]
    usage: Usage
