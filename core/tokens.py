"""Token counts estimated without a tokenizer.

DeepSeek documents that one English character is about 0.3 tokens and one
Chinese character about 0.6 tokens; this estimate uses those ratios (other
wide characters count like Chinese ones), rounded up, so budgets built on
it err on the safe side. Providers report the real counts, which is what
billing uses.
"""

from __future__ import annotations

import math
import re

from .types import ChatMessage

MESSAGE_OVERHEAD = 4
"""Tokens a chat template spends per message on role markers."""


_CJK = re.compile("[\u3000-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\U00020000-\U0002ffff]")
"""CJK ideographs, kana, hangul and full-width punctuation."""


def is_cjk(char: str) -> bool:
    """Whether ``char`` is a CJK ideograph, kana, hangul or full-width punctuation."""
    return _CJK.match(char) is not None


def estimate_tokens(text: str) -> int:
    """Estimated tokens of ``text`` (at least 1 for non-empty text)."""
    if not text:
        return 0
    # Counted from the UTF-8 length, in C: prompts run to hundreds of thousands of
    # characters and this runs on the event loop, so no Python loop per character.
    # CJK characters take three bytes; a two-byte one (Cyrillic, accented Latin)
    # counts as half of one, erring on the safe side for scripts that tokenize worse
    # than English.
    cjk = 0 if text.isascii() else (len(text.encode("utf-8", "surrogatepass")) - len(text)) / 2
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
