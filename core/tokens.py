"""Token counts estimated without a tokenizer.

DeepSeek documents that one English character is about 0.3 tokens and one
Chinese character about 0.6 tokens; this estimate uses those ratios (other
wide characters count like Chinese ones), rounded up, so budgets built on
it err on the safe side. Providers report the real counts, which is what
billing uses, up to what was reserved from these estimates.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import msgspec

from .types import (
    ChatMessage,
    ChatRequest,
    ContentDelta,
    Finish,
    ProviderEvent,
    ReasoningDelta,
    ToolCallDelta,
    Usage,
)

log = logging.getLogger("chatgate.tokens")

MESSAGE_OVERHEAD = 4
"""Tokens a chat template spends per message on role markers."""

IMAGE_TOKENS = 2_500
"""What one image part of a prompt is estimated at, whatever its size in bytes: the most
that OpenAI's and Anthropic's models count for one image (gpt-4.1-mini: 1,536 patches
× 1.62). Its base64 text would count a hundred times that."""

IMAGE_PARTS = frozenset({"image_url", "image", "input_image"})
"""Content part types that carry an image (OpenAI's chat and Responses, Anthropic's)."""

_CJK = re.compile("[\u3000-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\U00020000-\U0002ffff]")
"""CJK ideographs, kana, hangul and full-width punctuation."""

_encode = msgspec.json.Encoder().encode


def is_cjk(char: str) -> bool:
    """Whether ``char`` is a CJK ideograph, kana, hangul or full-width punctuation."""
    return _CJK.match(char) is not None


def _weight(text: str) -> float:
    """Estimated tokens of ``text``, not rounded (so the weights of pieces add up)."""
    # Counted from the UTF-8 length, in C: prompts run to hundreds of thousands of
    # characters and this runs on the event loop, so no Python loop per character.
    # CJK characters take three bytes; a two-byte one (Cyrillic, accented Latin)
    # counts as half of one, erring on the safe side for scripts that tokenize worse
    # than English.
    cjk = 0 if text.isascii() else (len(text.encode("utf-8", "surrogatepass")) - len(text)) / 2
    return 0.6 * cjk + 0.3 * (len(text) - cjk)


def estimate_tokens(text: str) -> int:
    """Estimated tokens of ``text`` (at least 1 for non-empty text)."""
    if not text:
        return 0
    return max(1, math.ceil(_weight(text)))


def estimate_json_tokens(value: Any) -> int:
    """Estimated tokens of ``value`` sent as JSON: its encoded text, keys and punctuation included."""
    return estimate_tokens(_encode(value).decode("utf-8", "replace"))


def _part_tokens(part: dict[str, Any]) -> int:
    kind = part.get("type")
    text = part.get("text")
    if kind == "text" and isinstance(text, str):
        return estimate_tokens(text)
    if kind in IMAGE_PARTS:
        return IMAGE_TOKENS
    return estimate_json_tokens(part)  # audio, files and the unknown: as sent (base64 errs high)


def estimate_message_tokens(message: ChatMessage) -> int:
    """Estimated tokens one message costs in a prompt, overhead included: every content part,
    tool call, name, tool result id, reasoning and extra field."""
    content = message.content
    if isinstance(content, str):
        tokens = estimate_tokens(content)
    elif content:
        tokens = sum(
            _part_tokens(part) if isinstance(part, dict) else estimate_json_tokens(part) for part in content
        )
    else:
        tokens = 0
    for call in message.tool_calls:
        tokens += estimate_tokens(call.id) + estimate_tokens(call.name) + estimate_tokens(call.arguments)
    if message.name:
        tokens += estimate_tokens(message.name)
    if message.tool_call_id:
        tokens += estimate_tokens(message.tool_call_id)
    if message.reasoning:
        tokens += estimate_tokens(message.reasoning)
    if message.extra:
        tokens += estimate_json_tokens(message.extra)
    return MESSAGE_OVERHEAD + tokens


def estimate_prompt_tokens(messages: tuple[ChatMessage, ...] | list[ChatMessage]) -> int:
    """Estimated prompt tokens of a whole message list."""
    return sum(estimate_message_tokens(m) for m in messages)


def estimate_request_tokens(request: ChatRequest) -> int:
    """Estimated prompt tokens of everything ``request`` sends upstream: its messages (see
    :func:`estimate_message_tokens`), its tool definitions, and every other field that
    carries text (``tool_choice``, ``response_format`` with its schema, ``stop``, extra
    fields). An over-estimate: what is reserved and checked against the context."""
    tokens = estimate_prompt_tokens(request.messages)
    rest = [
        value
        for value in (
            request.tools,
            request.tool_choice,
            request.response_format,
            request.stop,
            request.extra,
        )
        if value
    ]
    if rest:
        tokens += estimate_json_tokens(rest)
    return tokens


CUT_SLACK = 2
"""How many times its cap the text of a reply is estimated at before it is cut (see :class:`OutputMeter`)."""


class OutputMeter:
    """Counts what a reply produces against the output tokens reserved for it, ``cap``.

    A reply passes its cap with its ``cap + 1``-th piece (a non-empty delta: an upstream
    streams a token a piece at most), or once its text is estimated at more than
    :data:`CUT_SLACK` times ``cap`` tokens (for an upstream that sends many tokens a
    piece, or the whole reply at once). The estimate errs high for text that tokenizes
    well (code's indentation, repeated characters), so an honest reply, one the upstream
    kept within ``max_tokens``, is never cut; one from an upstream that ignores it is
    cut within about twice its cap, and the charge never passes the reservation anyway.
    """

    __slots__ = ("cap", "limit", "over", "pieces", "weight")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.limit = CUT_SLACK * cap
        self.pieces = 0
        self.weight = 0.0
        self.over = False
        """Whether the reply passed its cap: pass nothing more on, and end it as ``length``."""

    def admit(self, event: ProviderEvent) -> ProviderEvent | None:
        """``event`` as far as it fits the cap: whole, its text cut short, or None (past the cap)."""
        if isinstance(event, ContentDelta | ReasoningDelta):
            text = event.text
            if not text:
                return event
        elif isinstance(event, ToolCallDelta):
            text = (event.name or "") + event.arguments
        else:
            return event  # the finish
        self.pieces += 1
        weight = _weight(text)
        if self.pieces <= self.cap and self.weight + weight <= self.limit:
            self.weight += weight
            return event
        self.over = True
        if self.pieces > self.cap or isinstance(event, ToolCallDelta):
            return None  # a tool call's arguments cut short would not parse anyway
        keep = int(len(text) * (self.limit - self.weight) / weight)
        self.weight = self.limit
        return msgspec.structs.replace(event, text=text[:keep]) if keep > 0 else None

    def cut(self, prompt_tokens: int, provider: str, model: str) -> Finish:
        """The end of a reply that passed its cap (logged: its upstream ignored ``max_tokens``):
        ``length``, with the usage of a reply exactly as long as the cap."""
        log.warning(
            "provider %r sent more than the %d output tokens asked for %r; the reply was cut there",
            provider,
            self.cap,
            model,
        )
        return Finish("length", Usage(prompt_tokens=prompt_tokens, completion_tokens=self.cap))
