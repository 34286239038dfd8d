"""Long memory: the context of a conversation's next reply, within the model's budget.

What no longer fits is folded into the conversation's rolling summary,
written by the conversation's own model (or, with summaries off, dropped
oldest first), so a conversation of hundreds of turns still carries what
was said at its start. Summaries are charged to the conversation's owner
like any reply (or, where nobody pays, recorded unpriced within the quota).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import ClassVar

from ..errors import ContextTooLong, InsufficientBalance, ProviderError, RateLimitExceeded, Unavailable
from ..records import Conversation, ConversationPatch, Message
from ..reply import End, ReplyRun
from ..store import Store
from ..tokens import estimate_prompt_tokens, estimate_tokens
from ..types import ChatMessage, ChatRequest
from .billing import Billing, Quota
from .catalog import Route
from .context import fit_context

log = logging.getLogger("chatgate.memory")

FOLD_INSTRUCTIONS = (
    "You keep the running summary of a conversation between a user and an assistant. "
    "Rewrite the summary so far together with the new part of the conversation into one summary. "
    "Keep what later turns may need: names, facts, numbers, decisions, the user's preferences and "
    "requests, open questions. Write it in the language the conversation uses, as plain prose "
    "without preamble, in at most {words} words."
)


def budget_of(route: Route) -> int:
    """Tokens the prompt may use: the model's context minus room for the longest reply."""
    return route.config.context_tokens - route.config.max_output_tokens


class Memory:
    """Builds what goes upstream for a conversation's next reply.

    Promises: the messages returned fit the model's budget (system prompt and
    newest input included); reasoning is never among them; the stored
    conversation only ever changes by a longer summary, written after the
    provider produced it, so a failed summary loses nothing (its turns are
    dropped from this one prompt instead, and folded on a later turn).
    """

    def __init__(self, store: Store, billing: Billing) -> None:
        self.store = store
        self.billing = billing

    async def context(
        self,
        conversation: Conversation,
        messages: Sequence[Message],
        route: Route,
        *,
        question: str | None = None,
        system: str | None = None,
        summarize: bool = True,
        until: int | None = None,
        quota: Quota | None = None,
        key_id: int | None = None,
    ) -> tuple[ChatMessage, ...]:
        """The prompt for the next reply: summary, then as many recent turns as fit, then the input.

        ``messages`` are the conversation's stored ones, oldest first.
        ``question`` is a user turn not stored yet; without it the newest
        message (up to message id ``until``, when given) is the input.
        With ``quota``, summaries are usage nobody pays for, admitted within it
        (see :meth:`Billing.reserve`); with ``key_id``, they are that key's usage
        (counted in its limits, never refused by them: the question was admitted).

        Raises:
            ContextTooLong: the system prompt and the input alone exceed the budget; nothing was written.
        """
        summary, summarized = conversation.summary, conversation.summary_until
        if until is not None:
            messages = [m for m in messages if m.id <= until]
            if summarized is not None and summarized >= until:
                # The summary tells of later turns than this prompt's: go without it.
                summary, summarized, summarize = "", None, False
        history = [m for m in messages if summarized is None or m.id > summarized]
        budget = budget_of(route)
        try:
            window = fit_context(history, budget=budget, system=system, summary=summary, question=question)
        except ContextTooLong:
            # A long input and a long summary do not fit together: this one prompt goes without it.
            return fit_context((), budget=budget, system=system, question=question).messages
        if not window.dropped or not summarize:
            return window.messages
        # Fold down to half the budget, so the next turns fit without another summary.
        try:
            fold = fit_context(history, budget=budget // 2, system=system, summary=summary, question=question)
        except ContextTooLong:
            fold = window
        try:
            summary = await self._fold(conversation, route, summary, fold.dropped, budget, quota, key_id)
        except (ProviderError, InsufficientBalance, RateLimitExceeded) as exc:
            log.warning(
                "conversation %d: could not summarize %d earlier message(s), leaving them out of this "
                "prompt instead: %s",
                conversation.id,
                len(fold.dropped),
                exc,
            )
            return window.messages
        until_id = fold.dropped[-1].id
        await self.store.update_conversation(
            conversation.id, ConversationPatch(summary=summary, summary_until=until_id)
        )
        history = [m for m in history if m.id > until_id]
        try:
            return fit_context(
                history, budget=budget, system=system, summary=summary, question=question
            ).messages
        except ContextTooLong:
            return fit_context((), budget=budget, system=system, question=question).messages

    async def _fold(
        self,
        conversation: Conversation,
        route: Route,
        summary: str,
        turns: Sequence[Message],
        budget: int,
        quota: Quota | None = None,
        key_id: int | None = None,
    ) -> str:
        """The summary rewritten to cover ``turns`` too, in as many provider calls as their length needs."""
        limit = max(64, min(1024, budget // 8))
        instructions = FOLD_INSTRUCTIONS.format(words=limit * 2 // 3)
        summary = _clip(summary, budget // 4)  # a summary that outgrew its instructions
        batch: list[str] = []

        def fits(lines: list[str]) -> bool:
            request = _fold_request(route, instructions, summary, lines)
            return estimate_prompt_tokens(request.messages) <= budget

        for message in turns:
            line = f"{'User' if message.role == 'user' else 'Assistant'}: {message.content}"
            # What one call may carry: the budget less the instructions and the summary so far.
            room = budget - estimate_prompt_tokens(_fold_request(route, instructions, summary, []).messages)
            line = _clip(line, room // 2)
            if batch and not fits([*batch, line]):
                folded = await self._summarize(
                    conversation, route, instructions, summary, batch, quota, key_id
                )
                summary, batch = _clip(folded, budget // 4), []
            batch.append(line)
        if batch:
            summary = await self._summarize(conversation, route, instructions, summary, batch, quota, key_id)
        return summary

    async def _summarize(
        self,
        conversation: Conversation,
        route: Route,
        instructions: str,
        summary: str,
        lines: list[str],
        quota: Quota | None = None,
        key_id: int | None = None,
    ) -> str:
        request = _fold_request(route, instructions, summary, lines)
        # Under the key that asked (not keyless: keyless usage is what emails' quotas count).
        reservation = await self.billing.reserve(
            conversation.user_id, route, request, key_id=None if quota else key_id, quota=quota
        )
        run = _Fold(self.billing, route, request, reservation, time.monotonic())
        end = await run.pump()
        # Settled even when the caller was interrupted meanwhile: the tokens were spent.
        await asyncio.shield(run.settle(run.usage()))
        if end == "cancelled":
            raise asyncio.CancelledError  # the caller was cancelled (a newer question): so is this
        if run.error is not None:
            raise run.error
        folded = run.content.strip()
        if not folded:
            raise Unavailable(f"provider {route.provider.instance!r} answered an empty summary")
        return folded


class _Fold(ReplyRun):
    """One summary call: billed like a reply (ledger outcome ``summary``), its text kept."""

    outcomes: ClassVar[Mapping[End, str]] = {
        "complete": "summary",
        "cancelled": "summary_error",
        "error": "summary_error",
    }
    log = log
    require_finish = False  # the text it produced is the summary, finished or not


def _fold_request(route: Route, instructions: str, summary: str, lines: list[str]) -> ChatRequest:
    earlier = summary or "(none yet)"
    part = "\n\n".join(lines)
    return ChatRequest(
        model=route.model,
        messages=(
            ChatMessage(role="system", content=instructions),
            ChatMessage(
                role="user", content=f"Summary so far:\n{earlier}\n\nNew part of the conversation:\n{part}"
            ),
        ),
        # The instructions bound the summary; the model's whole allowance leaves a
        # reasoning model room to think first (settled to what it really used).
        max_tokens=route.config.max_output_tokens,
        stream=False,
    )


def _clip(text: str, tokens: int) -> str:
    """``text`` cut in the middle to about ``tokens`` tokens (its start and end say the most)."""
    if estimate_tokens(text) <= tokens:
        return text
    keep = max(1, len(text) * tokens // estimate_tokens(text) // 2)
    return f"{text[:keep]} [...] {text[-keep:]}"
