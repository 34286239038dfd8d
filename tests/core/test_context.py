"""Fitting conversations into a token budget."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from core import Message
from core.errors import ContextTooLong
from core.services.context import SUMMARY_PREAMBLE, fit_context
from core.tokens import estimate_message_tokens, estimate_prompt_tokens, estimate_tokens
from core.types import ChatMessage

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def message(id_: int, role: str, content: str, reasoning: str = "") -> Message:
    return Message(id_, 1, role, content, reasoning, "complete", None, 0, 0, None, NOW, NOW)  # type: ignore[arg-type]


def turns(count: int) -> list[Message]:
    history = []
    for i in range(count):
        history.append(message(2 * i + 1, "user", f"question number {i} " * 5))
        history.append(
            message(2 * i + 2, "assistant", f"answer number {i} " * 5, reasoning="secret thoughts")
        )
    return history


def test_everything_fits_in_a_large_budget():
    history = turns(3)
    window = fit_context(history, budget=10_000, system="Be brief.")
    assert window.messages[0] == ChatMessage(role="system", content="Be brief.")
    assert [m.content for m in window.messages[1:]] == [m.content for m in history]
    assert window.dropped == ()
    assert window.prompt_tokens == estimate_prompt_tokens(window.messages)


def test_the_oldest_turns_are_dropped_first_and_the_window_starts_with_a_user_turn():
    history = [*turns(10), message(21, "user", "the newest question")]
    budget = 200
    window = fit_context(history, budget=budget, system="Be brief.")
    assert window.prompt_tokens <= budget
    assert window.messages[-1].content == "the newest question"
    assert window.messages[1].role == "user"
    kept = len(window.messages) - 1
    assert [m.id for m in window.dropped] == [m.id for m in history[: len(history) - kept]]


def test_reasoning_is_never_sent_back():
    window = fit_context(turns(2), budget=10_000)
    assert all(m.reasoning is None for m in window.messages)
    assert not any("secret thoughts" in str(m.content) for m in window.messages)


def test_the_summary_follows_the_system_prompt_and_counts_against_the_budget():
    history = [message(1, "user", "hello")]
    window = fit_context(history, budget=10_000, system="sys", summary="we talked about boats")
    assert window.messages[1] == ChatMessage(
        role="system", content=SUMMARY_PREAMBLE + "we talked about boats"
    )
    assert window.prompt_tokens == estimate_prompt_tokens(window.messages)


def test_messages_without_content_are_left_out():
    history = [message(1, "user", "hi"), message(2, "assistant", ""), message(3, "user", "anyone there?")]
    window = fit_context(history, budget=10_000)
    # The two user turns left next to each other go as one: some upstreams refuse two in a row.
    assert [(m.role, m.content) for m in window.messages] == [("user", "hi\n\nanyone there?")]


def test_an_input_that_cannot_fit_is_an_error():
    with pytest.raises(ContextTooLong) as caught:
        fit_context([message(1, "user", "word " * 1000)], budget=50)
    assert caught.value.budget == 50
    assert caught.value.tokens > 50


def test_token_estimates_follow_deepseeks_ratios():
    assert estimate_tokens("") == 0
    assert estimate_tokens("a" * 10) == 3  # 0.3 per English character
    assert estimate_tokens("你好世界吗") == 3  # 0.6 per Chinese character
    assert estimate_tokens("привет") == 3  # a two-byte character counts as half a wide one: 0.45 each
    assert estimate_message_tokens(ChatMessage(role="user", content="a" * 10)) == 3 + 4
