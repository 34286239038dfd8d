"""Fitting a conversation into a model's context budget."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ContextTooLong
from ..records import Message
from ..tokens import estimate_message_tokens, estimate_prompt_tokens
from ..types import ChatMessage

SUMMARY_PREAMBLE = "Summary of the earlier part of this conversation:\n"


@dataclass(frozen=True)
class ContextWindow:
    """The messages to send, and the stored messages that did not fit (oldest first)."""

    messages: tuple[ChatMessage, ...]
    dropped: tuple[Message, ...]
    prompt_tokens: int


@functools.lru_cache(maxsize=65_536)
def _content_tokens(content: str) -> int:
    # Stored messages keep their str objects (and Python their hashes), so each turn of a
    # long conversation estimates only what is new.
    return estimate_message_tokens(ChatMessage(role="user", content=content))


def message_tokens(message: Message) -> int:
    """What a stored message costs in a prompt (reasoning is never sent)."""
    return _content_tokens(message.content)


def to_chat_message(message: Message) -> ChatMessage:
    """A stored message as prompt input. Reasoning is never sent back as input."""
    return ChatMessage(role=message.role, content=message.content)


def fit_context(
    history: Sequence[Message],
    *,
    budget: int,
    system: str | None = None,
    summary: str = "",
    question: str | None = None,
) -> ContextWindow:
    """Keep the newest messages of ``history`` that fit ``budget`` tokens.

    The newest input is ``question`` (a user turn not stored yet) when given,
    else the last message of ``history``; it is always kept. The system
    prompt and the rolling ``summary`` come first and count against the
    budget. Messages without content (a reply that failed before its first
    token) are left out; the kept part starts with a user turn, and turns of
    the same role that end up next to each other are joined into one (some
    upstreams, DeepSeek's reasoner among them, refuse two user turns in a row).

    Raises:
        ContextTooLong: the system prompt, summary and newest input alone exceed ``budget``.
    """
    head: list[ChatMessage] = []
    if system:
        head.append(ChatMessage(role="system", content=system))
    if summary:
        head.append(ChatMessage(role="system", content=SUMMARY_PREAMBLE + summary))
    used = sum(estimate_message_tokens(m) for m in head)
    usable = [m for m in history if m.content]
    if question is not None:
        newest = ChatMessage(role="user", content=question)
    elif usable:
        newest = to_chat_message(usable.pop())
    else:
        return ContextWindow(tuple(head), (), used)
    used += estimate_message_tokens(newest)
    if used > budget:
        raise ContextTooLong(used, budget)
    kept: list[Message] = []
    for message in reversed(usable):
        cost = message_tokens(message)
        if used + cost > budget:
            break
        used += cost
        kept.append(message)
    kept.reverse()
    while kept and kept[0].role != "user":
        used -= message_tokens(kept.pop(0))
    dropped = tuple(usable[: len(usable) - len(kept)])
    messages = (*head, *_joined([*(to_chat_message(m) for m in kept), newest]))
    return ContextWindow(messages, dropped, estimate_prompt_tokens(messages))


def _joined(turns: list[ChatMessage]) -> list[ChatMessage]:
    joined: list[ChatMessage] = []
    for turn in turns:
        if joined and joined[-1].role == turn.role and turn.role in ("user", "assistant"):
            joined[-1] = ChatMessage(role=turn.role, content=f"{joined[-1].content}\n\n{turn.content}")
        else:
            joined.append(turn)
    return joined
