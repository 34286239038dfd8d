"""The email surface's conversations: one per email, the newest question interrupting the running reply."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from core import Conversation, Generation, KeyedLock, Outcome, Payer, Services, Transcript, User

if TYPE_CHECKING:
    from . import Options

KIND = "email"


class Chats:
    """What the email surface's handlers share: the services, the options and the model's route.

    Promises: one conversation per email, isolated from every other; a newer question
    supersedes the one still being prepared and interrupts the running reply (both end
    as interrupted); a refused question (quota, context) stops nothing and, for a new
    email, creates no user; an email's usage is recorded at amount 0 within its quota.
    """

    def __init__(self, services: Services, options: Options) -> None:
        self.services = services
        self.options = options
        self.route = services.catalog.route(options.model)
        self.system = options.system_prompt or None
        # Per email, so two first messages make one conversation and /api/clear
        # never splits a question from its reply.
        self.starting = KeyedLock()

    async def ask(self, email: str, question: str) -> Generation:
        """Start the reply to ``question`` in the email's conversation.

        Raises:
            Superseded: a newer question of the same email came first.
            ContextTooLong: the question does not fit the model's context.
            RateLimitExceeded: the email is past its quota.
        """
        services, route, system = self.services, self.route, self.system
        payer = Payer(quota=self.options.quota())
        user = await services.accounts.find_user(email)
        if user is None:
            # What refuses a new email refuses it before it exists (the quota cannot:
            # nothing was used yet).
            services.conversations.opening(route, question, system=system)
            user = await services.accounts.ensure_user(email)
        # Admitted before a running question is superseded: a refused one stops nothing.
        admitted = await services.conversations.admit(user.id, route, question, system=system, payer=payer)
        try:
            await self.supersede(user)
            async with self.starting.hold(user.id):
                conversation = await self.conversation_of(user)
                taken, admitted = admitted, None  # ask's from here on
                return await services.conversations.ask(
                    conversation,
                    route,
                    question,
                    system=system,
                    summarize=self.options.summarize,
                    payer=payer,
                    admitted=taken,
                )
        finally:
            if admitted is not None:
                # Nothing went upstream. Shielded: were this caller cancelled again while
                # releasing, the reservation would count in flight until swept as stale.
                await asyncio.shield(services.billing.release(admitted))

    async def outcome(self, generation: Generation) -> Outcome | None:
        """How the reply ended; None when the store could not record the end (the log has why).

        A stopping server's cancellation interrupts the reply first.
        """
        try:
            return await generation.wait()
        except asyncio.CancelledError:
            # Only a stopping server cancels a waiting /api/chat: stop the reply (it is
            # saved as interrupted) and tell the caller how it ended.
            generations = self.services.generations
            if generations.current(generation.conversation_id) is generation:
                await asyncio.shield(generations.interrupt(generation.conversation_id))
            return await asyncio.shield(generation.wait())
        except Exception:
            return None

    async def transcript(self, email: str) -> Transcript | None:
        """The email's conversation, the running reply showing its partial text; None before any."""
        conversations = self.services.conversations
        user = await self.services.accounts.find_user(email)
        conversation = await conversations.latest(user.id, KIND) if user else None
        return await conversations.transcript(conversation) if conversation is not None else None

    async def clear(self, email: str) -> None:
        """Stop the email's reply and start a fresh conversation (unless the current one is empty)."""
        services = self.services
        user = await services.accounts.find_user(email)
        if user is None:
            return
        await self.supersede(user)
        async with self.starting.hold(user.id):
            conversation = await services.conversations.latest(user.id, KIND)
            if conversation is not None:
                elsewhere = await services.conversations.running_elsewhere(conversation)
                await services.generations.interrupt(conversation.id, stored=elsewhere)
                # Read again after the interrupt: it may have stored a partial reply.
                current = await services.conversations.get(user.id, conversation.id)
                if await services.conversations.messages(current):
                    await services.conversations.create(user.id, KIND)

    async def conversation_of(self, user: User) -> Conversation:
        conversations = self.services.conversations
        return await conversations.latest(user.id, KIND) or await conversations.create(user.id, KIND)

    async def supersede(self, user: User) -> None:
        # Before waiting for the email's lock: a question still being prepared holds it.
        latest = await self.services.conversations.latest(user.id, KIND)
        if latest is not None:
            self.services.conversations.supersede(latest.id)
