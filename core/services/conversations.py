"""Conversations and their messages, as surfaces see them: owner-checked and live."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

import msgspec

from ..errors import Conflict, InsufficientBalance, NotFound, Superseded
from ..locks import KeyedLock
from ..records import Conversation, ConversationPatch, Message, MessageDraft, MessagePatch
from ..store import Store
from ..tokens import estimate_tokens
from ..types import ChatMessage, ChatRequest
from .billing import Billing, Payer, Quota, Reservation
from .catalog import Route
from .context import fit_context
from .generations import Generation, Generations, Upstream
from .memory import Memory, budget_of

Messages = list[Message]  # named here: inside Conversations, ``list`` is a method


@dataclass(frozen=True)
class Transcript:
    """A conversation's messages, oldest first; the reply being generated shows its partial text."""

    messages: list[Message]
    generating: bool


class Conversations:
    """Owner-checked access to conversations: someone else's id is :class:`NotFound`, like a missing one."""

    cached_conversations = 256
    """How many conversations' messages are kept in memory (least recently read leave first)."""

    def __init__(self, store: Store, generations: Generations, billing: Billing, memory: Memory) -> None:
        self.store = store
        self.generations = generations
        self.billing = billing
        self.memory = memory
        self._asking = KeyedLock()
        self._preparing: dict[int, asyncio.Future[tuple[ChatMessage, ...]]] = {}
        self._messages: OrderedDict[int, tuple[int, Messages]] = OrderedDict()

    async def ask(
        self,
        conversation: Conversation,
        route: Route,
        question: str,
        *,
        system: str | None = None,
        memory: bool = True,
        summarize: bool = True,
        payer: Payer | None = None,
        admitted: Reservation | None = None,
    ) -> Generation:
        """Interrupt the conversation's running reply, then answer ``question`` in its context.

        The interrupted reply is persisted first, so its partial text is part
        of the new context. With ``memory`` the conversation's history goes
        upstream, fitted to the model's budget (see :class:`Memory`);
        without it only the system prompt and ``question``. The reply is
        limited to the model's ``max_output_tokens``, which is also what is
        reserved. ``payer`` says who pays and within what limits (default: the
        owner's balance); a payer with a quota is admitted (see :meth:`admit`)
        before anything is interrupted, summarized or written, and its
        summaries are unpriced too. ``admitted``, what :meth:`admit` returned
        for this question, is this call's from the start (released if nothing
        is started).

        A newer ``ask`` on the same conversation cancels an older one still
        summarizing its context: the older raises :class:`Superseded`.

        Raises:
            ContextTooLong: ``question`` alone does not fit; nothing was interrupted or written.
            InsufficientBalance: the owner cannot cover the worst case; nothing was written
                (nothing was interrupted either, unless the balance only just fell short).
            RateLimitExceeded: the key's limits or the quota do not admit it; nothing was
                written (with a quota, nothing was interrupted either).
            Superseded: a newer question arrived while this one was being prepared; this
                question was stored, without a reply.
        """
        payer = payer or Payer()
        owned = admitted is not None  # released here until start_reply takes it over
        try:
            opening = self.opening(route, question, system=system)  # too long: refuse before anything
            if admitted is None:
                admitted = await self.admit(conversation.user_id, route, question, system=system, payer=payer)
                owned = admitted is not None
            elsewhere = await self.running_elsewhere(conversation)
            busy = (
                self._asking.held(conversation.id)
                or conversation.id in self._preparing
                or self.generations.current(conversation.id) is not None
                or elsewhere is not None
            )
            if busy and payer.quota is None:  # something to interrupt: first refuse what is unpaid
                await self._check_balance(conversation, route, question)
            self.supersede(conversation.id)
            async with self._asking.hold(conversation.id):
                await self.generations.interrupt(conversation.id, stored=elsewhere)
                if memory:
                    context = self._context(
                        conversation, route, question, system, summarize, reread=busy, payer=payer
                    )
                    preparing = asyncio.ensure_future(context)
                    self._preparing[conversation.id] = preparing
                    try:
                        messages = await preparing
                    except asyncio.CancelledError:
                        if not preparing.cancelled() or _cancelling():
                            raise  # our own caller was cancelled
                        await self.store.append_message(
                            conversation.id, MessageDraft(role="user", content=question)
                        )
                        raise Superseded(
                            f"conversation {conversation.id}: a newer question arrived"
                        ) from None
                    finally:
                        if self._preparing.get(conversation.id) is preparing:
                            del self._preparing[conversation.id]
                else:
                    messages = opening.messages
                request = ChatRequest(
                    model=route.model, messages=messages, max_tokens=route.config.max_output_tokens
                )
                owned = False
                return await self.start_reply(
                    conversation, route, request, question=question, payer=payer, reservation=admitted
                )
        except BaseException:
            if owned and admitted is not None:
                # Nothing went upstream. Shielded: were this caller cancelled again while releasing,
                # the reservation would count in flight until swept as stale.
                await asyncio.shield(self.billing.release(admitted))
            raise

    async def admit(
        self, user_id: int, route: Route, question: str, *, system: str | None = None, payer: Payer
    ) -> Reservation | None:
        """Admit ``question`` for a payer with a quota, before anything else happens; None otherwise.

        Nobody pays such a request, so nothing waits on the estimate of its whole
        prompt: it is admitted within the quota first, so a refused question
        interrupts, summarizes and writes nothing. Pass the reservation to :meth:`ask`.

        Raises:
            ContextTooLong: ``question`` alone does not fit; nothing was written.
            RateLimitExceeded: the quota does not admit it; nothing was written.
        """
        opening = self.opening(route, question, system=system)
        if payer.quota is None:
            return None
        return await self.billing.reserve(user_id, route, opening, key_id=None, quota=payer.quota)

    @staticmethod
    def opening(route: Route, question: str, *, system: str | None = None) -> ChatRequest:
        """The request of ``question`` alone, after the system prompt.

        Raises:
            ContextTooLong: not even that fits the model's context (what :meth:`ask` refuses first).
        """
        messages = fit_context((), budget=budget_of(route), system=system, question=question).messages
        return ChatRequest(model=route.model, messages=messages, max_tokens=route.config.max_output_tokens)

    async def regenerate(
        self,
        conversation: Conversation,
        route: Route,
        message_id: int,
        *,
        system: str | None = None,
        memory: bool = True,
        payer: Payer | None = None,
    ) -> Generation:
        """Answer again, in place: a new reply replaces the one to the user message at ``message_id``
        (a user message, or the reply to one), keeping its id.

        The context is the conversation up to that user message. A user
        message without a reply gets one, if it is the last message.

        Raises:
            NotFound: ``message_id`` is not a message of the conversation.
            Conflict: the message is a reply to nothing, or a user message followed by another.
            InsufficientBalance: the owner cannot cover the worst case; nothing was changed.
            RateLimitExceeded: the key's limits do not admit it; nothing was changed.
        """
        elsewhere = await self.running_elsewhere(conversation)
        if self.generations.current(conversation.id) is not None or elsewhere is not None:
            # Something would be interrupted: refuse first if the new reply cannot be paid for.
            await self._check_balance(conversation, route, "")
        self.supersede(conversation.id)
        async with self._asking.hold(conversation.id):
            # The reply may be the running one, here or in another process.
            await self.generations.interrupt(conversation.id, stored=elsewhere)
            current = await self.store.get_conversation(conversation.id)
            messages = await self.messages(current)
            question, reply = _exchange(messages, message_id)
            if memory:
                context = await self.memory.context(
                    current, messages, route, until=question.id, system=system, summarize=False
                )
            else:
                context = fit_context([question], budget=budget_of(route), system=system).messages
            request = ChatRequest(
                model=route.model, messages=context, max_tokens=route.config.max_output_tokens
            )
            return await self.start_reply(
                conversation,
                route,
                request,
                question=None,
                payer=payer,
                replacing=reply,
                answers=question.id,
                newest=messages[-1].id if messages else None,  # what follows the reply stays
            )

    async def edit_message(self, conversation: Conversation, message_id: int, content: str) -> Message:
        """Change a message's text (it does not answer again; :meth:`regenerate` does).

        Raises:
            NotFound: ``message_id`` is not a message of the conversation.
            Conflict: the message is a reply still being generated.
        """
        async with self._asking.hold(conversation.id):  # not while a regenerate resets it
            message = await self.store.get_message(message_id)
            if message.conversation_id != conversation.id:
                raise NotFound(f"message {message_id} not found")
            live = self.generations.current(conversation.id)
            running = live.message_id if live is not None else None
            if running is None and (elsewhere := await self.running_elsewhere(conversation)) is not None:
                running = elsewhere.id  # generated by another process: its flushes would undo the edit
            if running == message_id:
                raise Conflict(f"message {message_id} is still being generated; wait for it or regenerate it")
            return await self.store.update_message(message_id, MessagePatch(content=content))

    async def question_of(self, conversation: Conversation, message_id: int) -> Message:
        """The user message a :meth:`regenerate` of ``message_id`` would answer.

        Raises:
            NotFound: ``message_id`` is not a message of the conversation.
            Conflict: there is no such exchange.
        """
        return _exchange(await self.messages(conversation), message_id)[0]

    def supersede(self, conversation_id: int) -> None:
        """Stop a question still being prepared for the conversation (its :meth:`ask` raises
        :class:`Superseded`), so whoever comes next never waits for its summary."""
        older = self._preparing.get(conversation_id)
        if older is not None:
            older.cancel()

    async def _context(
        self,
        conversation: Conversation,
        route: Route,
        question: str,
        system: str | None,
        summarize: bool,
        *,
        reread: bool,
        payer: Payer,
    ) -> tuple[ChatMessage, ...]:
        # After waiting for others, the summary may have grown meanwhile: read it again.
        current = await self.store.get_conversation(conversation.id) if reread else conversation
        return await self.memory.context(
            current,
            await self.messages(current),
            route,
            question=question,
            system=system,
            summarize=summarize,
            # Summaries of a conversation nobody pays for are unpriced too, bounded by the day's
            # tokens; the question was admitted already, so they take no request of the minute.
            quota=None if payer.quota is None else Quota(tokens_per_day=payer.quota.tokens_per_day),
            key_id=payer.key_id,
        )

    async def _check_balance(self, conversation: Conversation, route: Route, question: str) -> None:
        # Before interrupting anything: a question the balance cannot cover even with the
        # shortest prompt is refused outright (the reservation is the exact check).
        least = self.billing.cost(route, estimate_tokens(question), route.config.max_output_tokens)
        if least > 0:
            user = await self.store.get_user(conversation.user_id)
            if user.balance < least:
                raise InsufficientBalance(user.balance, -least)

    async def start_reply(
        self,
        conversation: Conversation,
        route: Route,
        request: ChatRequest,
        *,
        question: str | None,
        payer: Payer | None = None,
        replacing: Message | None = None,
        answers: int | None = None,
        reservation: Reservation | None = None,
        newest: int | None = None,
    ) -> Generation:
        """Store ``question`` (when given) and a reply being generated for it, and start generating.

        With ``replacing``, that reply is started over in place instead of a
        new one appended; ``answers`` names the user message it answers when
        ``question`` is not given.

        The worst-case cost is reserved first, as ``payer`` says (default: on the
        owner's balance, with no limit), so a request the balance or the limits
        do not admit writes nothing; or ``reservation``, made for this request,
        is used (and released here if nothing is started). The reply settles
        the reservation however it ends; a conversation's running reply is
        interrupted by the new one.

        Raises:
            InsufficientBalance: the owner's balance cannot cover the worst case; nothing was written.
            RateLimitExceeded: the payer's limits do not admit it; nothing was written.
        """
        if reservation is None:
            payer = payer or Payer()
            reservation = await self.billing.reserve(
                conversation.user_id,
                route,
                request,
                key_id=payer.key_id,
                limits=payer.limits,
                balance=payer.balance,
                quota=payer.quota,
            )
        # The request goes upstream now: storing the question and the reply overlaps its wait.
        upstream = Upstream(route, request)
        # A lease is released by the sweep of stale ones if this process dies, never by the
        # reply that holds it: such a reply names no reservation.
        held = reservation.entry.id if reservation.lease is None else None
        reply_draft = MessageDraft(role="assistant", status="generating", model=route.model, ledger_id=held)
        try:
            if replacing is not None:
                restart = MessagePatch(
                    content="",
                    reasoning="",
                    status="generating",
                    model=route.model,
                    prompt_tokens=0,
                    completion_tokens=0,
                    error=None,
                    ledger_id=held,
                )
                reply = await self.store.update_message(replacing.id, restart)
            elif question is None:
                reply = await self.store.append_message(conversation.id, reply_draft)
            else:
                asked, reply = await self.store.append_messages(
                    conversation.id, [MessageDraft(role="user", content=question), reply_draft]
                )
                answers = asked.id
        except BaseException:
            # At once: nothing came back yet, or nobody would see it. Shielded, like ask's release.
            await asyncio.shield(self._withdraw(upstream, reservation))
            raise
        try:
            return await self.generations.run(
                conversation.id,
                reply.id,
                route,
                request,
                reservation=reservation,
                question_id=answers,
                upstream=upstream,
                revision=reply.revision,
                newest=max(reply.id, newest or 0),
            )
        except BaseException:
            # Cancelled before the reply took the stream over: the stored reply is swept and
            # settled as abandoned; the upstream request must not run on unseen.
            await upstream.aclose()
            raise

    async def _withdraw(self, upstream: Upstream, reservation: Reservation) -> None:
        """End a request that will not be followed, and give its reservation back."""
        try:
            await upstream.aclose()
        finally:
            await self.billing.release(reservation)

    async def create(
        self, user_id: int, kind: str, name: str = "", series_id: int | None = None
    ) -> Conversation:
        return await self.store.create_conversation(user_id, kind, name, series_id)

    async def list(
        self, user_id: int, kind: str | None = None, series_id: int | None = None
    ) -> list[Conversation]:
        return await self.store.list_conversations(user_id, kind, series_id)

    async def latest(self, user_id: int, kind: str) -> Conversation | None:
        """The user's most recently started conversation of ``kind``, if any."""
        found = await self.store.list_conversations(user_id, kind)
        return found[-1] if found else None

    async def get(self, user_id: int, conversation_id: int) -> Conversation:
        """The user's conversation (``NotFound`` for anyone else's); its messages, when they are
        kept here, are brought up to date in the same store round trip."""
        cached = self._messages.get(conversation_id)
        if cached is None:
            conversation = await self.store.get_conversation(conversation_id)
        else:
            conversation, changed = await self.store.conversation_since(conversation_id, cached[0])
            self._remember(conversation, cached, changed)
        if conversation.user_id != user_id:
            raise NotFound(f"conversation {conversation_id} not found")
        return conversation

    async def append(self, conversation: Conversation, drafts: tuple[MessageDraft, ...]) -> Messages:
        """Append finished messages (no reply is generated) to ``conversation``, one the caller
        got from :meth:`create` or :meth:`get`, so its owner was checked; all or none where the
        store has transactions."""
        return await self.store.append_messages(conversation.id, list(drafts))

    async def update(self, user_id: int, conversation_id: int, patch: ConversationPatch) -> Conversation:
        await self.get(user_id, conversation_id)
        return await self.store.update_conversation(conversation_id, patch)

    async def delete(self, user_id: int, conversation_id: int) -> Conversation:
        """Delete a conversation with its messages, interrupting its reply first."""
        conversation = await self.get(user_id, conversation_id)
        await self.generations.interrupt(conversation_id, stored=await self.running_elsewhere(conversation))
        return await self.store.delete_conversation(conversation_id)

    async def running_elsewhere(self, conversation: Conversation) -> Message | None:
        """The conversation's reply the store shows being generated by another process (with a
        cluster store; None otherwise, or when the reply runs here)."""
        if self.generations.cluster is None or self.generations.current(conversation.id) is not None:
            return None
        current = await self.get(conversation.user_id, conversation.id)  # one round trip
        return next((m for m in reversed(await self.messages(current)) if m.status == "generating"), None)

    async def messages(self, conversation: Conversation) -> Messages:
        """The conversation's stored messages, oldest first. Shared: do not mutate the list.

        Cached by the conversation's revision, so a long conversation read
        again and again (a polled record) costs one store read per change,
        whichever process made it, and that read returns only what changed.
        """
        cached = self._messages.get(conversation.id)
        if cached is not None and cached[0] == conversation.revision:
            self._messages.move_to_end(conversation.id)
            return cached[1]
        # A write after ``conversation`` was read moves its revision past the one this
        # list is kept under, so the next reader fetches again: newer, never staler.
        if cached is None or cached[0] > conversation.revision:
            messages = await self.store.list_messages(conversation.id)
            self._keep(conversation, messages)
            return messages
        # Only what changed since: a long conversation is not read whole for each turn.
        changed = await self.store.changed_messages(conversation.id, cached[0])
        return self._remember(conversation, cached, changed)

    def _remember(
        self, conversation: Conversation, cached: tuple[int, Messages], changed: Messages
    ) -> Messages:
        """``cached`` brought up to ``conversation``'s revision with the messages changed since."""
        if cached[0] > conversation.revision:
            return cached[1]  # read before a newer list was kept: keep the newer
        if not changed:
            if cached[0] < conversation.revision:
                self._keep(conversation, cached[1])
            return cached[1]
        by_id = {m.id: m for m in cached[1]}
        by_id.update((m.id, m) for m in changed)
        messages = sorted(by_id.values(), key=lambda m: m.id)
        self._keep(conversation, messages)
        return messages

    def _keep(self, conversation: Conversation, messages: Messages) -> None:
        self._messages[conversation.id] = (conversation.revision, messages)
        self._messages.move_to_end(conversation.id)
        while len(self._messages) > self.cached_conversations:
            self._messages.popitem(last=False)

    async def transcript(self, conversation: Conversation) -> Transcript:
        """The messages with the reply being generated here overlaid as far as it has got."""
        messages = await self.messages(conversation)
        live = self.generations.current(conversation.id)
        if live is not None and all(m.id != live.message_id for m in messages):
            # The reply started after the messages were read: read them again, past the cache.
            messages = await self.store.list_messages(conversation.id)
        if live is None:
            # Another worker process may be generating: its flushes keep the stored text current.
            return Transcript(messages, generating=any(m.status == "generating" for m in messages))
        overlaid = [
            msgspec.structs.replace(m, content=live.content, reasoning=live.reasoning)
            if m.id == live.message_id
            else m
            for m in messages
        ]
        return Transcript(overlaid, generating=True)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _exchange(messages: Messages, message_id: int) -> tuple[Message, Message | None]:
    """The user message and its reply (None if it has none) that ``message_id`` belongs to."""
    index = next((i for i, m in enumerate(messages) if m.id == message_id), None)
    if index is None:
        raise NotFound(f"message {message_id} not found")
    if messages[index].role == "assistant":
        before = [m for m in messages[:index] if m.role == "user"]
        if not before:
            raise Conflict(
                f"message {message_id} answers no user message; there is nothing to regenerate from"
            )
        return before[-1], messages[index]
    following = messages[index + 1] if index + 1 < len(messages) else None
    if following is None or following.role == "assistant":
        return messages[index], following
    raise Conflict(f"message {message_id} is followed by another user message, not by a reply to replace")
