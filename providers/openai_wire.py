"""OpenAI's chat-completions wire format, as DeepSeek and compatible servers speak it.

Only the fields a reply needs are decoded, into typed structs, because a
stream decodes one chunk per token and typed decoding is the cheap way to do
it. Requests are encoded from core's types following DeepSeek's rules.
"""

from __future__ import annotations

import base64
import email.utils
import struct
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from core import ChatMessage, FinishReason, Usage


class FunctionPart(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class ToolCallPart(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: FunctionPart | None = None


class Message(msgspec.Struct):
    """A streamed ``delta`` or a whole ``message``: the same fields either way."""

    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # vLLM, Ollama and OpenRouter name it so
    tool_calls: list[ToolCallPart] | None = None


class Choice(msgspec.Struct):
    index: int = 0
    delta: Message | None = None
    message: Message | None = None
    finish_reason: str | None = None
    # Any: optional extras an upstream may write its own way must not fail the chunk (see entries()).
    logprobs: Any = None

    def entries(self) -> tuple[dict[str, Any], ...] | None:
        """The content tokens' logprob entries as the upstream wrote them (only the objects among
        them); None when it sent none, or sent them in a shape that is not OpenAI's."""
        content = self.logprobs.get("content") if isinstance(self.logprobs, dict) else None
        if not isinstance(content, list):
            return None
        return tuple(entry for entry in content if isinstance(entry, dict))


class Chunk(msgspec.Struct):
    """A ``chat.completion.chunk``, a whole ``chat.completion``, or an error event."""

    choices: list[Choice] | None = None
    usage: dict[str, Any] | None = None
    error: Any = None
    system_fingerprint: Any = None  # a string, if anything: see fingerprint()

    def fingerprint(self) -> str | None:
        """The upstream's ``system_fingerprint`` when it is a string (anything else is ignored)."""
        return self.system_fingerprint if isinstance(self.system_fingerprint, str) else None


class EmbeddingItem(msgspec.Struct):
    """One vector of an embeddings answer: floats, or base64 of little-endian float32."""

    embedding: list[float] | str
    index: int = 0


class EmbeddingAnswer(msgspec.Struct):
    """An OpenAI-style ``/embeddings`` answer (or an error body)."""

    data: list[EmbeddingItem] | None = None
    usage: dict[str, Any] | None = None
    error: Any = None


decode_embeddings = msgspec.json.Decoder(EmbeddingAnswer).decode


def vector_of(embedding: list[float] | str) -> tuple[float, ...]:
    """A vector from its float list or its base64 (little-endian float32, as OpenAI encodes it).

    Raises ValueError when the base64 is not whole float32 values.
    """
    if isinstance(embedding, list):
        return tuple(embedding)
    raw = base64.b64decode(embedding, validate=True)
    if len(raw) % 4:
        raise ValueError(f"{len(raw)} bytes are not whole float32 values")
    return struct.unpack(f"<{len(raw) // 4}f", raw)


decode_chunk = msgspec.json.Decoder(Chunk).decode
encode = msgspec.json.Encoder().encode

FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
    "insufficient_system_resource": "insufficient_system_resource",
}
"""Upstream finish reasons as core's; anything else reads as "stop"."""


def usage_from(raw: dict[str, Any]) -> Usage | None:
    """An upstream ``usage`` object as core's :class:`~core.types.Usage`.

    DeepSeek's own counters (``prompt_cache_hit_tokens``, ...) and any other
    fields the upstream adds are kept in ``extra``. None when the object does
    not count both prompt and completion tokens: a reply must not pass as free.
    """
    if not (_is_count(raw.get("prompt_tokens")) and _is_count(raw.get("completion_tokens"))):
        return None
    prompt_details = raw.get("prompt_tokens_details")
    completion_details = raw.get("completion_tokens_details")
    extra = {
        key: value
        for key, value in raw.items()
        if key not in ("prompt_tokens", "completion_tokens", "total_tokens")
        and isinstance(value, int | float | str | dict)
        and not isinstance(value, bool)
    }
    cached = prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else None
    reasoning = completion_details.get("reasoning_tokens") if isinstance(completion_details, dict) else None
    return Usage(
        prompt_tokens=_int(raw.get("prompt_tokens")),
        completion_tokens=_int(raw.get("completion_tokens")),
        reasoning_tokens=_int(reasoning),
        cached_tokens=_int(cached if cached is not None else raw.get("prompt_cache_hit_tokens")),
        extra=extra,
    )


def wire_messages(messages: Sequence[ChatMessage], *, reasoning: bool) -> list[dict[str, Any]]:
    """``messages`` as OpenAI-style JSON; with ``reasoning``, following DeepSeek's rule for it.

    DeepSeek's thinking mode ignores the reasoning of plain turns, but once a
    tool call happened it requires ``reasoning_content`` on that assistant
    message and on every one after it (a missing one is a 400, an empty
    string is accepted). So reasoning goes back from the first tool-call turn
    on, and is dropped before it, where it would only cost upload and
    tokens. Without ``reasoning`` it is never sent: other servers may reject
    the field.
    """
    out = []
    tools_used = False
    for message in messages:
        wire = wire_message(message)
        if reasoning and message.role == "assistant":
            tools_used = tools_used or bool(message.tool_calls)
            if tools_used:
                wire["reasoning_content"] = message.reasoning or ""
        out.append(wire)
    return out


def wire_message(message: ChatMessage) -> dict[str, Any]:
    """``message`` as OpenAI-style JSON, without its reasoning."""
    out: dict[str, Any] = {"role": message.role}
    out["content"] = message.content if message.content is not None or message.role != "assistant" else ""
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": c.type, "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    for key, value in message.extra.items():
        if key not in out and key not in ("reasoning_content", "reasoning"):
            out[key] = value
    return out


def error_message(text: str) -> str:
    """The human message of an error body in DeepSeek's, OpenAI's, vLLM's or llama.cpp's shape."""
    try:
        body = msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError):  # msgspec gives up on deep nesting with the latter
        return text.strip()[:500]
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if body.get("message"):
            return str(body["message"])
    return text.strip()[:500]


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds a ``Retry-After`` (or ``retry-after-ms``) header asks to wait, if it says.

    ``headers`` look names up case-insensitively (as aiohttp's and httpx's do).
    """
    if ms := headers.get("retry-after-ms"):
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _is_count(value: Any) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and value >= 0 and value == int(value)
    )


def _int(value: Any) -> int:
    return int(value) if _is_count(value) else 0


def snippet(payload: bytes) -> str:
    text = payload[:200].decode("utf-8", errors="replace")
    return text + ("..." if len(payload) > 200 else "")
