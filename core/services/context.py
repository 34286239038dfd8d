"""Fitting a conversation into a model's context budget."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ContextTooLong
from ..store import Message
from ..tokens import estimate_message_tokens
from ..types import ChatMessage

SUMMARY_PREAMBLE = "Summary of the earlier part of this conversation:\n"


@dataclass(frozen=True)
class ContextWindow:
    """The messages to send, and the stored messages that did not fit (oldest first)."""

    messages: tuple[ChatMessage, ...]
    dropped: tuple[Message, ...]
    prompt_tokens: int


def to_chat_message(message: Message) -> ChatMessage:
    """A stored message as prompt input. Reasoning is never sent back as input."""
    return ChatMessage(role=message.role, content=message.content)


def fit_context(
    history: Sequence[Message],
    *,
    budget: int,
    system: str | None = None,
    summary: str = "",
) -> ContextWindow:
    """Keep the newest messages of ``history`` that fit ``budget`` tokens.

    ``history`` ends with the newest input, which is always kept. The system
    prompt and the rolling ``summary`` come first and count against the
    budget. Messages without content (a reply that failed before its first
    token) are left out; the kept part starts with a user turn.

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
    if not usable:
        return ContextWindow(tuple(head), (), used)
    newest = to_chat_message(usable[-1])
    used += estimate_message_tokens(newest)
    if used > budget:
        raise ContextTooLong(used, budget)
    kept: list[Message] = [usable[-1]]
    for message in reversed(usable[:-1]):
        cost = estimate_message_tokens(to_chat_message(message))
        if used + cost > budget:
            break
        used += cost
        kept.append(message)
    kept.reverse()
    while len(kept) > 1 and kept[0].role != "user":
        used -= estimate_message_tokens(to_chat_message(kept.pop(0)))
    kept_ids = {m.id for m in kept}
    dropped = tuple(m for m in history if m.id not in kept_ids and m.content)
    messages = (*head, *(to_chat_message(m) for m in kept))
    return ContextWindow(messages, dropped, used)
