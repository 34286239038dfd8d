"""Token counts estimated without a tokenizer.

DeepSeek documents that one English character is about 0.3 tokens and one
Chinese character about 0.6 tokens; this estimate uses those ratios, rounded
up, so budgets built on it err on the safe side. Providers report the real
counts, which is what billing uses.
"""

from __future__ import annotations

import math

from .types import ChatMessage

MESSAGE_OVERHEAD = 4
"""Tokens a chat template spends per message on role markers."""


def is_cjk(char: str) -> bool:
    """Whether ``char`` is a CJK ideograph, kana, hangul or full-width punctuation."""
    code = ord(char)
    return (
        0x3000 <= code <= 0x9FFF
        or 0xAC00 <= code <= 0xD7AF
        or 0xF900 <= code <= 0xFAFF
        or 0xFF00 <= code <= 0xFFEF
        or 0x20000 <= code <= 0x2FFFF
    )


def estimate_tokens(text: str) -> int:
    """Estimated tokens of ``text`` (at least 1 for non-empty text)."""
    if not text:
        return 0
    cjk = sum(1 for c in text if is_cjk(c))
    return max(1, math.ceil(0.6 * cjk + 0.3 * (len(text) - cjk)))


def estimate_message_tokens(message: ChatMessage) -> int:
    """Estimated tokens one message costs in a prompt, overhead included."""
    content = message.content
    if isinstance(content, list):
        text = " ".join(str(part.get("text", "")) for part in content)
    else:
        text = content or ""
    calls = sum(estimate_tokens(c.name) + estimate_tokens(c.arguments) for c in message.tool_calls)
    return MESSAGE_OVERHEAD + estimate_tokens(text) + calls


def estimate_prompt_tokens(messages: tuple[ChatMessage, ...] | list[ChatMessage]) -> int:
    """Estimated prompt tokens of a whole message list."""
    return sum(estimate_message_tokens(m) for m in messages)
