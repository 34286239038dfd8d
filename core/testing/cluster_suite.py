"""The conformance suite every cluster store passes (:class:`core.cluster.ClusterStore`).

Subclass :class:`ClusterConformance` (it includes the store and lease suites
for a store that also offers leases: combine it with
:class:`~core.testing.store_suite.LeaseConformance`) and define, besides
``open_store``, a fixture ``vanish`` returning an async callable that makes a
joined store instance disappear the way a killed process does: without leaving,
its liveness gone (for a socket, closed; for a database session, ended).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from core import ClusterStore, LedgerDraft, MessageDraft, MessagePatch, RateLimits, Store

from .store_suite import OpensStores, OpenStore, funded_user

Vanish = Callable[[Store], Awaitable[None]]
"""What ``vanish`` returns: makes a joined store instance disappear like a killed process."""


class Inbox:
    """Signals one joined instance received, to wait for."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self._arrived = asyncio.Event()

    def __call__(self, message: str) -> None:
        self.messages.append(message)
        self._arrived.set()

    async def wait_for(self, message: str) -> None:
        async with asyncio.timeout(10):  # a bound for a lost signal, not a timing expectation
            while message not in self.messages:
                self._arrived.clear()
                await self._arrived.wait()


class ClusterConformance(OpensStores):
    """Tests every cluster store passes: what :class:`~core.cluster.ClusterStore` promises."""

    async def joined(self, connect_store: OpenStore) -> tuple[ClusterStore, Inbox, str]:
        store = await connect_store()
        assert isinstance(store, ClusterStore), f"{type(store).__name__} is no ClusterStore"
        inbox = Inbox()
        return store, inbox, await store.join(inbox)

    @pytest.mark.asyncio
    async def test_each_process_joins_with_an_id_of_its_own(self, connect_store: OpenStore) -> None:
        store = await connect_store()
        assert isinstance(store, ClusterStore)
        assert store.standing() is not None  # not joined: not in standing
        first = await store.join(Inbox())
        _, _, second = await self.joined(connect_store)
        assert first != second
        assert store.standing() is None

    @pytest.mark.asyncio
    async def test_a_signal_reaches_every_other_process(self, connect_store: OpenStore) -> None:
        sender, own, _ = await self.joined(connect_store)
        first, first_inbox, _ = await self.joined(connect_store)
        _, second_inbox, _ = await self.joined(connect_store)
        await sender.signal("interrupt 7 42")
        await first_inbox.wait_for("interrupt 7 42")
        await second_inbox.wait_for("interrupt 7 42")
        await first.signal("done")
        await own.wait_for("done")
        assert own.messages == ["done"]  # never its own signal

    @pytest.mark.asyncio
    async def test_what_a_dead_process_owned_is_taken_over_once(
        self, connect_store: OpenStore, vanish: Vanish
    ) -> None:
        dying, _, _ = await self.joined(connect_store)
        user = await funded_user(dying, "owner@example.com", 10_000)
        key = await dying.create_api_key(user.id, "k", "cg-k", "hash-k")
        held, _ = await dying.admit(
            LedgerDraft(user_id=user.id, amount=-50, kind="reservation", key_id=key.id), RateLimits()
        )
        free, _ = await dying.admit(
            LedgerDraft(user_id=user.id, amount=-30, kind="reservation", key_id=key.id), RateLimits()
        )
        conversation = await dying.create_conversation(user.id, "topic")
        question, reply = await dying.append_messages(
            conversation.id,
            [
                MessageDraft(role="user", content="hi"),
                MessageDraft(role="assistant", status="generating", ledger_id=held.id),
            ],
        )
        await dying.update_message(reply.id, MessagePatch(content="partial"))
        done = await dying.append_message(conversation.id, MessageDraft(role="assistant", content="done"))

        survivor, _, _ = await self.joined(connect_store)
        # The survivor's own reply, running: never taken over while it lives.
        other = await survivor.create_conversation(user.id, "topic")
        mine = await survivor.append_message(other.id, MessageDraft(role="assistant", status="generating"))

        assert await survivor.recover() == ([], [])  # nobody died yet
        await vanish(dying)
        replies, entries = await survivor.recover()
        assert [(m.id, m.status, m.content) for m in replies] == [(reply.id, "interrupted", "partial")]
        assert [e.id for e in entries] == [free.id]  # the held one is the reply's, settled with it
        assert await survivor.recover() == ([], [])  # once
        assert (await survivor.get_message(mine.id)).status == "generating"
        assert (await survivor.get_message(done.id)).status == "complete"
        assert (await survivor.get_message(question.id)).status == "complete"

    @pytest.mark.asyncio
    async def test_a_reply_restarted_elsewhere_belongs_to_its_new_process(
        self, connect_store: OpenStore, vanish: Vanish
    ) -> None:
        dying, _, _ = await self.joined(connect_store)
        survivor, _, _ = await self.joined(connect_store)
        user = await dying.ensure_user("again@example.com")
        conversation = await dying.create_conversation(user.id, "topic")
        reply = await dying.append_message(
            conversation.id, MessageDraft(role="assistant", status="generating")
        )
        # Another process regenerates it in place (after interrupting it).
        await survivor.update_message(reply.id, MessagePatch(content="", status="generating"))
        await vanish(dying)
        assert await survivor.recover() == ([], [])
        assert (await survivor.get_message(reply.id)).status == "generating"

    @pytest.mark.asyncio
    async def test_a_process_that_leaves_leaves_nothing_behind(self, connect_store: OpenStore) -> None:
        leaving, _, _ = await self.joined(connect_store)
        survivor, _, _ = await self.joined(connect_store)
        user = await leaving.ensure_user("leaves@example.com")
        conversation = await leaving.create_conversation(user.id, "topic")
        await leaving.append_message(conversation.id, MessageDraft(role="assistant", content="done"))
        await leaving.aclose()
        assert await survivor.recover() == ([], [])
