"""The conformance suite every store passes.

Subclass :class:`StoreConformance` in a test module and define one fixture,
``open_store``, returning an async callable that opens a *new* store
instance on the test's fresh database::

    from core.testing.store_suite import OpenStore, StoreConformance

    class TestMyStore(StoreConformance):
        @pytest.fixture
        def open_store(self, tmp_path: Path) -> OpenStore:
            async def open_store() -> Store:
                store = MyStore("my_store", MyStore.Options(path=str(tmp_path / "db")))
                await store.open()
                return store

            return open_store

Calling it twice gives two instances sharing data, like two server workers.
The suite closes every instance it opened. It needs pytest-asyncio.

A store that offers leases (a :class:`~core.store.LeaseStore`) subclasses
:class:`LeaseConformance` instead, which runs these tests and the lease tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio

from core import (
    MAX_BALANCE,
    BalanceTooLarge,
    ConversationPatch,
    InsufficientBalance,
    LeaseStore,
    LedgerDraft,
    LedgerEntry,
    LedgerSettlement,
    MessageDraft,
    MessagePatch,
    MessageRole,
    NotFound,
    RateLimitExceeded,
    RateLimits,
    Store,
    StoreError,
    User,
    utcnow,
)

OpenStore = Callable[[], Awaitable[Store]]
"""What ``open_store`` returns: opens a new store instance on the test's database."""

MISSING = 987_654_321
"""An id no test creates."""


async def tick() -> None:
    """Wait until utcnow() is certainly past every timestamp written so far (stores keep ms)."""
    await asyncio.sleep(0.005)


def not_found(kind: str, row_id: int) -> AbstractContextManager[pytest.ExceptionInfo[NotFound]]:
    """Expect NotFound with a message naming the kind of row and its id."""
    return pytest.raises(NotFound, match=rf"(?i)\b{kind}\b.*\b{row_id}\b")


async def funded_user(store: Store, email: str, balance: int) -> User:
    """A new user whose balance was set by one top-up."""
    user = await store.ensure_user(email)
    await store.post_ledger(LedgerDraft(user_id=user.id, amount=balance, kind="topup"))
    return await store.get_user(user.id)


def charge(user: User, amount: int) -> LedgerDraft:
    return LedgerDraft(user_id=user.id, amount=-amount, kind="charge")


def reservation(user: User, key_id: int, amount: int = 10, prompt_tokens: int = 5) -> LedgerDraft:
    return LedgerDraft(
        user_id=user.id, amount=-amount, kind="reservation", key_id=key_id, prompt_tokens=prompt_tokens
    )


def keyless(user: User, prompt_tokens: int = 5) -> LedgerDraft:
    """A reservation no key pays for (the email surface's): amount 0."""
    return LedgerDraft(user_id=user.id, amount=0, kind="reservation", prompt_tokens=prompt_tokens)


def lease(user: User, key_id: int, requests: int, amount: int = 100, tokens: int = 50) -> LedgerDraft:
    return LedgerDraft(
        user_id=user.id, amount=-amount, kind="lease", key_id=key_id, prompt_tokens=tokens, requests=requests
    )


def ledger_total(entries: list[LedgerEntry]) -> int:
    return sum(entry.amount for entry in entries)


class OpensStores:
    """What every suite of stores shares: ``connect_store``, which opens store instances on
    the test's database through the subclass's ``open_store`` and closes them at teardown."""

    @pytest_asyncio.fixture
    async def connect_store(self, open_store: OpenStore) -> AsyncIterator[OpenStore]:
        """``open_store``, remembering each instance so teardown closes it."""
        opened: list[Store] = []

        async def connect() -> Store:
            store = await open_store()
            opened.append(store)
            return store

        yield connect
        for store in opened:
            await store.aclose()


class StoreConformance(OpensStores):
    """Tests every store must pass: the behaviour :class:`~core.store.Store` promises.

    Where the interface leaves a choice, the suite pins it down: creating a
    row for a missing user raises NotFound; ``balance_after`` of a settled
    entry is the user's balance right after the settlement.
    """

    @pytest_asyncio.fixture
    async def store(self, connect_store: OpenStore) -> Store:
        return await connect_store()

    # lifecycle

    @pytest.mark.asyncio
    async def test_ping_and_describe(self, store: Store) -> None:
        await store.ping()
        assert store.describe()["plugin"] == store.name

    @pytest.mark.asyncio
    async def test_data_survives_close_and_reopen(self, store: Store, connect_store: OpenStore) -> None:
        user = await funded_user(store, "keep@example.com", 500)
        key = await store.create_api_key(user.id, "laptop", "cg-keep", "hash-keep")
        conversation = await store.create_conversation(user.id, "topic", "kept")
        message = await store.append_message(conversation.id, MessageDraft(role="user", content="hello"))
        conversation = await store.get_conversation(conversation.id)
        ledger = await store.list_ledger(user.id)

        await store.aclose()
        await store.open()
        other = await connect_store()
        for instance in (store, other):
            assert await instance.get_user(user.id) == user
            assert await instance.find_api_key("hash-keep") == key
            assert await instance.get_conversation(conversation.id) == conversation
            assert await instance.list_messages(conversation.id) == [message]
            assert await instance.list_ledger(user.id) == ledger

    # users

    @pytest.mark.asyncio
    async def test_ensure_user_creates_with_zero_balance(self, store: Store) -> None:
        before = utcnow()
        user = await store.ensure_user("new@example.com")
        assert user.email == "new@example.com"
        assert user.balance == 0
        assert user.created_at.utcoffset() == timedelta(0)
        assert before <= user.created_at <= utcnow()

    @pytest.mark.asyncio
    async def test_emails_are_lowercased_and_compared_case_insensitively(self, store: Store) -> None:
        user = await store.ensure_user("  Alice@Example.COM ")
        assert user.email == "alice@example.com"
        assert await store.ensure_user("alice@example.com") == user
        assert await store.ensure_user("ALICE@EXAMPLE.COM") == user
        assert await store.find_user("aLiCe@example.com") == user
        assert await store.find_user("bob@example.com") is None
        assert await store.list_users() == [user]

    @pytest.mark.asyncio
    async def test_get_and_list_users(self, store: Store) -> None:
        zed = await store.ensure_user("zed@example.com")
        amy = await store.ensure_user("amy@example.com")
        assert await store.get_user(zed.id) == zed
        assert await store.list_users() == [zed, amy]
        with not_found("user", MISSING):
            await store.get_user(MISSING)

    @pytest.mark.asyncio
    async def test_concurrent_ensure_user_creates_one_user(
        self, store: Store, connect_store: OpenStore
    ) -> None:
        other = await connect_store()
        users = await asyncio.gather(
            *(instance.ensure_user("race@example.com") for _ in range(10) for instance in (store, other))
        )
        assert len({user.id for user in users}) == 1
        assert len(await store.list_users()) == 1

    # API keys

    @pytest.mark.asyncio
    async def test_create_and_find_api_key(self, store: Store) -> None:
        user = await store.ensure_user("keys@example.com")
        key = await store.create_api_key(user.id, "laptop", "cg-abc", "hash-1")
        assert (key.user_id, key.name, key.prefix, key.revoked_at) == (user.id, "laptop", "cg-abc", None)
        assert key.active
        assert await store.find_api_key("hash-1") == key
        assert await store.find_api_key("hash-unknown") is None
        assert await store.find_api_key_owner("hash-1") == (key, await store.get_user(user.id))
        assert await store.find_api_key_owner("hash-unknown") is None

    @pytest.mark.asyncio
    async def test_list_api_keys_by_user_and_all(self, store: Store) -> None:
        amy = await store.ensure_user("amy@example.com")
        bob = await store.ensure_user("bob@example.com")
        amy1 = await store.create_api_key(amy.id, "one", "cg-a1", "hash-a1")
        bob1 = await store.create_api_key(bob.id, "one", "cg-b1", "hash-b1")
        amy2 = await store.create_api_key(amy.id, "two", "cg-a2", "hash-a2")
        assert await store.list_api_keys(amy.id) == [amy1, amy2]
        assert await store.list_api_keys(bob.id) == [bob1]
        assert await store.list_api_keys() == [amy1, bob1, amy2]
        assert await store.list_api_keys(MISSING) == []

    @pytest.mark.asyncio
    async def test_revoke_api_key_is_idempotent(self, store: Store) -> None:
        user = await store.ensure_user("keys@example.com")
        key = await store.create_api_key(user.id, "laptop", "cg-abc", "hash-1")
        await tick()
        revoked = await store.revoke_api_key(key.id)
        assert revoked.revoked_at is not None
        assert not revoked.active
        assert revoked.revoked_at > key.created_at
        assert (revoked.id, revoked.user_id, revoked.name, revoked.prefix, revoked.created_at) == (
            key.id,
            key.user_id,
            key.name,
            key.prefix,
            key.created_at,
        )
        await tick()
        assert await store.revoke_api_key(key.id) == revoked
        assert await store.find_api_key("hash-1") == revoked
        assert await store.list_api_keys(user.id) == [revoked]

    @pytest.mark.asyncio
    async def test_api_key_missing_ids(self, store: Store) -> None:
        with not_found("key", MISSING):
            await store.revoke_api_key(MISSING)
        with not_found("user", MISSING):
            await store.create_api_key(MISSING, "orphan", "cg-x", "hash-x")
        assert await store.list_api_keys() == []

    # ledger

    @pytest.mark.asyncio
    async def test_post_ledger_moves_balance_and_records_entry(self, store: Store) -> None:
        user = await store.ensure_user("pay@example.com")
        key = await store.create_api_key(user.id, "k", "cg-k", "hash-k")
        topup = await store.post_ledger(LedgerDraft(user_id=user.id, amount=1000, kind="topup", note="gift"))
        assert (topup.user_id, topup.amount, topup.balance_after, topup.kind) == (
            user.id,
            1000,
            1000,
            "topup",
        )
        assert topup.note == "gift"
        assert topup.created_at == topup.updated_at
        draft = LedgerDraft(
            user_id=user.id,
            amount=-300,
            kind="charge",
            key_id=key.id,
            model="deepseek-chat",
            provider="deepseek",
            prompt_tokens=11,
            completion_tokens=22,
            latency_ms=333,
            outcome="ok",
        )
        spent = await store.post_ledger(draft)
        assert spent.balance_after == 700
        assert (spent.amount, spent.kind, spent.key_id, spent.model, spent.provider) == (
            -300,
            "charge",
            key.id,
            "deepseek-chat",
            "deepseek",
        )
        assert (
            spent.prompt_tokens,
            spent.completion_tokens,
            spent.latency_ms,
            spent.outcome,
            spent.note,
        ) == (
            11,
            22,
            333,
            "ok",
            None,
        )
        assert (await store.get_user(user.id)).balance == 700
        assert await store.list_ledger(user.id) == [spent, topup]
        assert await store.list_ledger(user.id, limit=1) == [spent]

    @pytest.mark.asyncio
    async def test_ledger_is_per_user(self, store: Store) -> None:
        amy = await funded_user(store, "amy@example.com", 10)
        bob = await funded_user(store, "bob@example.com", 20)
        assert [entry.amount for entry in await store.list_ledger(amy.id)] == [10]
        assert [entry.amount for entry in await store.list_ledger(bob.id)] == [20]
        assert await store.list_ledger(MISSING) == []

    @pytest.mark.asyncio
    async def test_floor_rejection_changes_nothing(self, store: Store) -> None:
        user = await funded_user(store, "pay@example.com", 100)
        ledger = await store.list_ledger(user.id)
        with pytest.raises(InsufficientBalance) as caught:
            await store.post_ledger(charge(user, 101))
        assert (caught.value.balance, caught.value.amount) == (100, -101)
        assert (await store.get_user(user.id)).balance == 100
        assert await store.list_ledger(user.id) == ledger
        exact = await store.post_ledger(charge(user, 100))
        assert exact.balance_after == 0

    @pytest.mark.asyncio
    async def test_custom_floor(self, store: Store) -> None:
        user = await store.ensure_user("credit@example.com")
        assert (await store.post_ledger(charge(user, 50), floor=-50)).balance_after == -50
        with pytest.raises(InsufficientBalance):
            await store.post_ledger(charge(user, 1), floor=-50)
        assert (await store.get_user(user.id)).balance == -50

    @pytest.mark.asyncio
    async def test_no_floor_allows_negative_balance(self, store: Store) -> None:
        user = await funded_user(store, "pay@example.com", 10)
        entry = await store.post_ledger(charge(user, 25), floor=None)
        assert entry.balance_after == -15
        assert (await store.get_user(user.id)).balance == -15

    @pytest.mark.asyncio
    async def test_a_top_up_always_lands_even_below_the_floor(self, store: Store) -> None:
        user = await funded_user(store, "debt@example.com", 10)
        await store.post_ledger(charge(user, 25), floor=None)
        repaid = await store.post_ledger(LedgerDraft(user_id=user.id, amount=5, kind="topup"), floor=0)
        assert repaid.balance_after == -10
        assert (await store.get_user(user.id)).balance == -10

    @pytest.mark.asyncio
    async def test_a_credit_past_the_ceiling_is_refused_and_changes_nothing(self, store: Store) -> None:
        user = await funded_user(store, "rich@example.com", MAX_BALANCE - 10)
        ledger = await store.list_ledger(user.id)
        for amount in (11, MAX_BALANCE, MAX_BALANCE + 1, 2**63, 10**30):
            with pytest.raises(BalanceTooLarge) as caught:
                await store.post_ledger(LedgerDraft(user_id=user.id, amount=amount, kind="topup"))
            assert (caught.value.balance, caught.value.amount) == (MAX_BALANCE - 10, amount)
        with pytest.raises(InsufficientBalance):  # a charge past the ceiling, whatever the floor
            await store.post_ledger(charge(user, 2**64), floor=None)
        assert (await store.get_user(user.id)).balance == MAX_BALANCE - 10
        assert await store.list_ledger(user.id) == ledger
        exact = await store.post_ledger(LedgerDraft(user_id=user.id, amount=10, kind="topup"))
        assert exact.balance_after == MAX_BALANCE
        assert (await store.get_user(user.id)).balance == MAX_BALANCE
        spent = await store.post_ledger(charge(user, MAX_BALANCE))
        assert spent.balance_after == 0

    @pytest.mark.asyncio
    async def test_concurrent_credits_never_pass_the_ceiling(
        self, store: Store, connect_store: OpenStore
    ) -> None:
        other = await connect_store()
        step = MAX_BALANCE // 10
        user = await funded_user(store, "rich@example.com", MAX_BALANCE - 3 * step)
        credit = LedgerDraft(user_id=user.id, amount=step, kind="topup")
        results = await asyncio.gather(
            *((store, other)[i % 2].post_ledger(credit) for i in range(20)), return_exceptions=True
        )
        posted = [result for result in results if isinstance(result, LedgerEntry)]
        refused = [result for result in results if isinstance(result, BalanceTooLarge)]
        assert (len(posted), len(refused)) == (3, 17)
        assert max(entry.balance_after for entry in posted) == MAX_BALANCE
        assert (await other.get_user(user.id)).balance == MAX_BALANCE
        assert ledger_total(await store.list_ledger(user.id)) == MAX_BALANCE

    @pytest.mark.asyncio
    async def test_usage_of_amounts_at_the_ceiling_adds_up_exactly(self, store: Store) -> None:
        # Ten charges of the largest balance sum past a 64-bit integer's range in micro-credits
        # (and a store's own integer sum): usage still adds them up exactly.
        user = await store.ensure_user("whale@example.com")
        for _ in range(10):
            await store.post_ledger(LedgerDraft(user_id=user.id, amount=MAX_BALANCE, kind="topup"))
            await store.post_ledger(charge(user, MAX_BALANCE))
        days = await store.usage_by_day(utcnow() - timedelta(days=1), user_id=user.id)
        assert sum(day.requests for day in days) == 10  # one day, or two around midnight
        assert sum(day.cost for day in days) == 10 * MAX_BALANCE

    @pytest.mark.asyncio
    async def test_post_ledger_for_missing_user(self, store: Store) -> None:
        with not_found("user", MISSING):
            await store.post_ledger(LedgerDraft(user_id=MISSING, amount=5, kind="topup"))

    @pytest.mark.asyncio
    async def test_a_reservation_settles_once(self, store: Store) -> None:
        user = await funded_user(store, "pay@example.com", 1000)
        reservation = await store.post_ledger(
            LedgerDraft(user_id=user.id, amount=-200, kind="reservation", model="m", provider="p")
        )
        other = await store.post_ledger(charge(user, 100))
        assert other.balance_after == 700
        await tick()

        cheaper = await store.settle_ledger(
            reservation.id,
            LedgerSettlement(
                amount=-150, prompt_tokens=10, completion_tokens=20, latency_ms=123, outcome="ok"
            ),
        )
        assert (cheaper.id, cheaper.amount, cheaper.kind) == (reservation.id, -150, "charge")
        assert (cheaper.prompt_tokens, cheaper.completion_tokens, cheaper.latency_ms, cheaper.outcome) == (
            10,
            20,
            123,
            "ok",
        )
        assert (cheaper.model, cheaper.provider, cheaper.created_at) == ("m", "p", reservation.created_at)
        assert cheaper.updated_at > reservation.updated_at
        assert cheaper.balance_after == 750  # the balance right after the settlement
        assert (await store.get_user(user.id)).balance == 750

        # Settled once: a second settlement (another process's, say) changes nothing.
        again = await store.settle_ledger(reservation.id, LedgerSettlement(amount=-260, outcome="long"))
        assert again == cheaper
        assert (await store.get_user(user.id)).balance == 750

        ledger = await store.list_ledger(user.id)
        assert len(ledger) == 3
        assert ledger[:2] == [other, cheaper]
        assert sum(entry.amount for entry in ledger) == 750

    @pytest.mark.asyncio
    async def test_settle_missing_entry(self, store: Store) -> None:
        with not_found("ledger", MISSING):
            await store.settle_ledger(MISSING, LedgerSettlement(amount=-1))

    # conversations

    @pytest.mark.asyncio
    async def test_create_conversation_defaults(self, store: Store) -> None:
        user = await store.ensure_user("talk@example.com")
        conversation = await store.create_conversation(user.id, "email")
        assert (conversation.user_id, conversation.kind, conversation.name) == (user.id, "email", "")
        assert (conversation.favorite, conversation.series_id) == (False, None)
        assert (conversation.summary, conversation.summary_until) == ("", None)
        assert conversation.created_at == conversation.updated_at
        assert conversation.created_at.tzinfo is not None
        assert conversation.created_at.utcoffset() == timedelta(0)
        named = await store.create_conversation(user.id, "topic", "Rust", series_id=7)
        assert (named.name, named.series_id) == ("Rust", 7)
        assert await store.get_conversation(conversation.id) == conversation
        with not_found("conversation", MISSING):
            await store.get_conversation(MISSING)
        with not_found("user", MISSING):
            await store.create_conversation(MISSING, "email")

    @pytest.mark.asyncio
    async def test_list_conversations_filters_oldest_first(self, store: Store) -> None:
        amy = await store.ensure_user("amy@example.com")
        bob = await store.ensure_user("bob@example.com")
        mail = await store.create_conversation(amy.id, "email")
        rust7 = await store.create_conversation(amy.id, "topic", series_id=7)
        go8 = await store.create_conversation(amy.id, "topic", series_id=8)
        bobs = await store.create_conversation(bob.id, "topic", series_id=7)
        rust7b = await store.create_conversation(amy.id, "topic", series_id=7)
        assert await store.list_conversations(amy.id) == [mail, rust7, go8, rust7b]
        assert await store.list_conversations(amy.id, kind="topic") == [rust7, go8, rust7b]
        assert await store.list_conversations(amy.id, kind="topic", series_id=7) == [rust7, rust7b]
        assert await store.list_conversations(amy.id, series_id=8) == [go8]
        assert await store.list_conversations(amy.id, kind="nothing") == []
        assert await store.list_conversations(bob.id) == [bobs]

    @pytest.mark.asyncio
    async def test_update_conversation_changes_only_set_fields(self, store: Store) -> None:
        user = await store.ensure_user("talk@example.com")
        conversation = await store.create_conversation(user.id, "topic", "old", series_id=3)
        await tick()
        renamed = await store.update_conversation(conversation.id, ConversationPatch(name="new"))
        assert renamed.name == "new"
        assert renamed.updated_at > conversation.updated_at
        assert (renamed.favorite, renamed.summary, renamed.summary_until, renamed.series_id) == (
            False,
            "",
            None,
            3,
        )
        assert (renamed.id, renamed.user_id, renamed.kind, renamed.created_at) == (
            conversation.id,
            user.id,
            "topic",
            conversation.created_at,
        )
        starred = await store.update_conversation(conversation.id, ConversationPatch(favorite=True))
        assert (starred.name, starred.favorite) == ("new", True)
        summed = await store.update_conversation(
            conversation.id, ConversationPatch(summary="so far", summary_until=41)
        )
        assert (summed.name, summed.favorite, summed.summary, summed.summary_until) == (
            "new",
            True,
            "so far",
            41,
        )
        cleared = await store.update_conversation(conversation.id, ConversationPatch(summary_until=None))
        assert (cleared.summary, cleared.summary_until) == ("so far", None)
        assert await store.get_conversation(conversation.id) == cleared
        with not_found("conversation", MISSING):
            await store.update_conversation(MISSING, ConversationPatch(name="x"))

    @pytest.mark.asyncio
    async def test_delete_conversation_deletes_its_messages(self, store: Store) -> None:
        user = await store.ensure_user("talk@example.com")
        doomed = await store.create_conversation(user.id, "topic", "doomed")
        kept = await store.create_conversation(user.id, "topic", "kept")
        doomed_messages = [
            await store.append_message(doomed.id, MessageDraft(role="user", content=str(i))) for i in range(3)
        ]
        kept_message = await store.append_message(kept.id, MessageDraft(role="user", content="stay"))
        doomed = await store.get_conversation(doomed.id)
        kept = await store.get_conversation(kept.id)

        assert await store.delete_conversation(doomed.id) == doomed
        with not_found("conversation", doomed.id):
            await store.get_conversation(doomed.id)
        for message in doomed_messages:
            with not_found("message", message.id):
                await store.get_message(message.id)
        assert await store.list_conversations(user.id) == [kept]
        assert await store.list_messages(kept.id) == [kept_message]
        with not_found("conversation", doomed.id):
            await store.delete_conversation(doomed.id)

    @pytest.mark.asyncio
    @pytest.mark.parametrize("default", [False, True], ids=["store", "default"])
    async def test_delete_stale_conversations_of_a_kind_with_their_messages(
        self, store: Store, default: bool
    ) -> None:
        """The store's own statement, and the default built from the other methods (what a store
        that does not override it runs), delete the same rows."""
        delete = (
            (lambda *a, **k: Store.delete_stale_conversations(store, *a, **k))
            if default
            else store.delete_stale_conversations
        )
        ada = await store.ensure_user("ada@example.com")
        bob = await store.ensure_user("bob@example.com")
        old = await store.create_conversation(ada.id, "response")
        said = await store.append_message(old.id, MessageDraft(role="user", content="old"))
        empty = await store.create_conversation(bob.id, "response")
        other_kind = await store.create_conversation(ada.id, "topic")
        await tick()
        cutoff = datetime.now(UTC)
        await tick()
        fresh = await store.create_conversation(ada.id, "response")
        fresh_empty = await store.create_conversation(bob.id, "response")
        await store.append_message(fresh.id, MessageDraft(role="user", content="new"))

        assert await delete("response", cutoff, empty_only=True) == 1  # only the old empty one
        with not_found("conversation", empty.id):
            await store.get_conversation(empty.id)
        assert await delete("response", cutoff) == 1
        with not_found("conversation", old.id):
            await store.get_conversation(old.id)
        with not_found("message", said.id):
            await store.get_message(said.id)
        assert await store.list_conversations(ada.id) == [
            other_kind,
            await store.get_conversation(fresh.id),
        ]
        assert await store.list_conversations(bob.id) == [fresh_empty]
        assert await delete("response", cutoff) == 0

    # messages

    @pytest.mark.asyncio
    async def test_append_message_moves_conversation_updated_at(self, store: Store) -> None:
        user = await store.ensure_user("talk@example.com")
        conversation = await store.create_conversation(user.id, "topic")
        await tick()
        message = await store.append_message(conversation.id, MessageDraft(role="user", content="hi"))
        assert (message.conversation_id, message.role, message.content) == (conversation.id, "user", "hi")
        assert (message.reasoning, message.status, message.model, message.error) == (
            "",
            "complete",
            None,
            None,
        )
        assert (message.prompt_tokens, message.completion_tokens) == (0, 0)
        assert message.created_at == message.updated_at
        assert message.created_at > conversation.created_at
        bumped = await store.get_conversation(conversation.id)
        assert bumped.updated_at >= message.created_at
        assert bumped.updated_at > conversation.updated_at
        assert await store.get_message(message.id) == message
        with not_found("conversation", MISSING):
            await store.append_message(MISSING, MessageDraft(role="user"))
        with not_found("message", MISSING):
            await store.get_message(MISSING)

    @pytest.mark.asyncio
    async def test_update_message_changes_only_set_fields(self, store: Store) -> None:
        user = await store.ensure_user("talk@example.com")
        conversation = await store.create_conversation(user.id, "topic")
        draft = MessageDraft(role="assistant", status="generating", model="m1")
        message = await store.append_message(conversation.id, draft)
        await tick()
        partial = await store.update_message(message.id, MessagePatch(content="partial"))
        assert (partial.content, partial.reasoning, partial.status, partial.model) == (
            "partial",
            "",
            "generating",
            "m1",
        )
        assert partial.updated_at > message.updated_at
        assert (partial.id, partial.role, partial.created_at) == (message.id, "assistant", message.created_at)
        done = await store.update_message(
            message.id, MessagePatch(reasoning="why", status="complete", prompt_tokens=5, completion_tokens=7)
        )
        assert (done.content, done.reasoning, done.status, done.model) == ("partial", "why", "complete", "m1")
        assert (done.prompt_tokens, done.completion_tokens, done.error) == (5, 7, None)
        failed = await store.update_message(
            message.id, MessagePatch(status="error", error="boom", model=None)
        )
        assert (failed.status, failed.error, failed.model) == ("error", "boom", None)
        assert (failed.content, failed.reasoning, failed.prompt_tokens, failed.completion_tokens) == (
            "partial",
            "why",
            5,
            7,
        )
        assert await store.get_message(message.id) == failed
        with not_found("message", MISSING):
            await store.update_message(MISSING, MessagePatch(content="x"))

    @pytest.mark.asyncio
    async def test_revision_moves_with_every_write_to_the_messages(self, store: Store) -> None:
        user = await store.ensure_user("talk@example.com")
        conversation = await store.create_conversation(user.id, "topic")
        other = await store.create_conversation(user.id, "topic")
        seen = [conversation.revision]

        async def moved() -> None:
            revision = (await store.get_conversation(conversation.id)).revision
            assert revision not in seen
            seen.append(revision)

        message = await store.append_message(
            conversation.id, MessageDraft(role="assistant", status="generating")
        )
        await moved()
        await store.update_message(message.id, MessagePatch(content="partial"))
        await moved()
        await store.interrupt_stale_generations(utcnow() + timedelta(seconds=1))
        await moved()
        # Reads, another conversation's messages and the conversation's own fields leave it alone.
        await store.list_messages(conversation.id)
        await store.append_message(other.id, MessageDraft(role="user", content="elsewhere"))
        await store.update_conversation(conversation.id, ConversationPatch(name="renamed", summary="s"))
        assert (await store.get_conversation(conversation.id)).revision == seen[-1]
        listed = await store.list_conversations(user.id)
        assert [c.revision for c in listed if c.id == conversation.id] == [seen[-1]]

    @pytest.mark.asyncio
    async def test_append_messages_appends_in_order_or_not_at_all(self, store: Store) -> None:
        user = await store.ensure_user("talk@example.com")
        conversation = await store.create_conversation(user.id, "topic")
        question, reply = await store.append_messages(
            conversation.id,
            [MessageDraft(role="user", content="q"), MessageDraft(role="assistant", status="generating")],
        )
        assert (question.role, question.content, reply.role, reply.status) == (
            "user",
            "q",
            "assistant",
            "generating",
        )
        assert question.id < reply.id
        assert await store.list_messages(conversation.id) == [question, reply]
        with not_found("conversation", MISSING):
            await store.append_messages(MISSING, [MessageDraft(role="user", content="lost")])

    @pytest.mark.asyncio
    async def test_changed_messages_are_those_written_after_a_revision(self, store: Store) -> None:
        user = await store.ensure_user("talk@example.com")
        conversation = await store.create_conversation(user.id, "topic")
        first = await store.append_message(conversation.id, MessageDraft(role="user", content="one"))
        reply = await store.append_message(
            conversation.id, MessageDraft(role="assistant", status="generating")
        )
        assert first.revision < reply.revision
        assert await store.list_messages(conversation.id) == [first, reply]
        mark = (await store.get_conversation(conversation.id)).revision
        assert mark == reply.revision
        assert await store.changed_messages(conversation.id, mark) == []
        grown = await store.update_message(reply.id, MessagePatch(content="partial"))
        second = await store.append_message(conversation.id, MessageDraft(role="user", content="two"))
        assert grown.revision > mark
        assert await store.changed_messages(conversation.id, mark) == [grown, second]
        assert await store.changed_messages(conversation.id, 0) == [first, grown, second]
        assert await store.list_messages(conversation.id) == [first, grown, second]

    @pytest.mark.asyncio
    async def test_conversation_since_reads_the_conversation_and_what_changed_together(
        self, store: Store
    ) -> None:
        user = await store.ensure_user("talk@example.com")
        conversation = await store.create_conversation(user.id, "topic")
        first = await store.append_message(conversation.id, MessageDraft(role="user", content="one"))
        mark = (await store.get_conversation(conversation.id)).revision
        assert await store.conversation_since(conversation.id, mark) == (
            await store.get_conversation(conversation.id),
            [],
        )
        second = await store.append_message(conversation.id, MessageDraft(role="assistant", content="two"))
        read, changed = await store.conversation_since(conversation.id, mark)
        assert read == await store.get_conversation(conversation.id)
        assert read.revision == second.revision > mark
        assert changed == [second]
        assert (await store.conversation_since(conversation.id, 0))[1] == [first, second]
        with pytest.raises(NotFound):
            await store.conversation_since(MISSING, 0)

    @pytest.mark.asyncio
    async def test_list_messages_oldest_first_per_conversation(self, store: Store) -> None:
        user = await store.ensure_user("talk@example.com")
        one = await store.create_conversation(user.id, "topic")
        two = await store.create_conversation(user.id, "topic")
        expected: dict[int, list[object]] = {one.id: [], two.id: []}
        for i in range(6):
            conversation_id = (one.id, two.id)[i % 2]
            role: MessageRole = "user" if i // 2 % 2 == 0 else "assistant"
            message = await store.append_message(conversation_id, MessageDraft(role=role, content=str(i)))
            expected[conversation_id].append(message)
        assert await store.list_messages(one.id) == expected[one.id]
        assert await store.list_messages(two.id) == expected[two.id]

    @pytest.mark.asyncio
    async def test_interrupt_stale_generations(self, store: Store) -> None:
        user = await store.ensure_user("talk@example.com")
        conversation = await store.create_conversation(user.id, "topic")
        stale = await store.append_message(
            conversation.id, MessageDraft(role="assistant", status="generating")
        )
        touched = await store.append_message(
            conversation.id, MessageDraft(role="assistant", status="generating")
        )
        finished = await store.append_message(conversation.id, MessageDraft(role="assistant", content="done"))
        await tick()
        cutoff = utcnow()
        await tick()
        await store.update_message(touched.id, MessagePatch(content="still streaming"))
        fresh = await store.append_message(
            conversation.id, MessageDraft(role="assistant", status="generating")
        )

        [interrupted] = await store.interrupt_stale_generations(cutoff)
        assert interrupted == await store.get_message(stale.id)
        assert interrupted.status == "interrupted"
        assert interrupted.updated_at >= cutoff
        assert (await store.get_message(touched.id)).status == "generating"
        assert await store.get_message(finished.id) == finished
        assert await store.get_message(fresh.id) == fresh
        assert await store.interrupt_stale_generations(cutoff) == []
        later = await store.interrupt_stale_generations(utcnow() + timedelta(seconds=1))
        assert [m.id for m in later] == [touched.id, fresh.id]

    @pytest.mark.asyncio
    async def test_a_reply_keeps_the_reservation_it_holds(self, store: Store) -> None:
        user = await funded_user(store, "hold@example.com", 100)
        hold = await store.post_ledger(charge(user, 40))
        assert await store.get_ledger_entry(hold.id) == hold
        conversation = await store.create_conversation(user.id, "topic")
        reply = await store.append_message(
            conversation.id, MessageDraft(role="assistant", status="generating", ledger_id=hold.id)
        )
        assert reply.ledger_id == hold.id
        assert (await store.get_message(reply.id)).ledger_id == hold.id
        with not_found("ledger entry", MISSING):
            await store.get_ledger_entry(MISSING)

    # concurrency

    @pytest.mark.asyncio
    async def test_concurrent_appends_all_land(self, store: Store, connect_store: OpenStore) -> None:
        """50 appends at once, split across two instances (two workers) on one database."""
        other = await connect_store()
        user = await store.ensure_user("talk@example.com")
        conversation = await store.create_conversation(user.id, "topic")
        appended = await asyncio.gather(
            *(
                (store, other)[i % 2].append_message(
                    conversation.id, MessageDraft(role="user", content=str(i))
                )
                for i in range(50)
            )
        )
        assert len({message.id for message in appended}) == 50
        listed = await store.list_messages(conversation.id)
        assert sorted(listed, key=lambda message: message.id) == listed
        assert sorted(appended, key=lambda message: message.id) == listed
        assert [m.created_at for m in listed] == sorted(m.created_at for m in listed)

    @pytest.mark.asyncio
    async def test_concurrent_charges_across_two_instances_add_up(
        self, store: Store, connect_store: OpenStore
    ) -> None:
        other = await connect_store()
        user = await funded_user(store, "pay@example.com", 1000)
        entries = await asyncio.gather(
            *((store, other)[i % 2].post_ledger(charge(user, 7)) for i in range(50))
        )
        assert (await store.get_user(user.id)).balance == 650
        assert (await other.get_user(user.id)).balance == 650
        # Serialised charges leave every intermediate balance exactly once.
        assert sorted(entry.balance_after for entry in entries) == [1000 - 7 * k for k in range(50, 0, -1)]
        ledger = await other.list_ledger(user.id)
        assert len(ledger) == 51
        assert sum(entry.amount for entry in ledger) == 650

    @pytest.mark.asyncio
    async def test_concurrent_charges_never_overdraw(self, store: Store, connect_store: OpenStore) -> None:
        other = await connect_store()
        user = await funded_user(store, "pay@example.com", 100)
        results = await asyncio.gather(
            *((store, other)[i % 2].post_ledger(charge(user, 10)) for i in range(50)), return_exceptions=True
        )
        posted = [result for result in results if isinstance(result, LedgerEntry)]
        refused = [result for result in results if isinstance(result, InsufficientBalance)]
        assert (len(posted), len(refused)) == (10, 40)
        assert all(entry.balance_after >= 0 for entry in posted)
        assert (await store.get_user(user.id)).balance == 0
        ledger = await store.list_ledger(user.id)
        assert len(ledger) == 11
        assert sum(entry.amount for entry in ledger) == 0

    # --- rate limits ---

    async def keyed_user(self, store: Store, balance: int = 1_000_000) -> tuple[User, int]:
        user = await funded_user(store, "limited@example.com", balance)
        key = await store.create_api_key(user.id, "limited", "sk-cg-limit", "hash-limited")
        return user, key.id

    @pytest.mark.asyncio
    async def test_api_key_limits_are_stored_and_replaced(self, store: Store) -> None:
        user, key_id = await self.keyed_user(store)
        key = (await store.list_api_keys(user.id))[0]
        assert key.limits == RateLimits()
        limits = RateLimits(requests_per_minute=5, tokens_per_minute=None, concurrent_requests=2)
        assert (await store.set_api_key_limits(key_id, limits)).limits == limits
        found = await store.find_api_key("hash-limited")
        assert found is not None
        assert found.limits == limits
        assert (await store.set_api_key_limits(key_id, RateLimits())).limits == RateLimits()
        with pytest.raises(NotFound):
            await store.set_api_key_limits(key_id + 1000, limits)

    @pytest.mark.asyncio
    async def test_admit_counts_the_minute_and_refuses_past_the_limit(self, store: Store) -> None:
        user, key_id = await self.keyed_user(store)
        limits = RateLimits(requests_per_minute=3)
        uses = [(await store.admit(reservation(user, key_id), limits))[1] for _ in range(3)]
        assert [u.requests for u in uses] == [1, 2, 3]
        assert [u.tokens for u in uses] == [5, 10, 15]
        assert [u.concurrent for u in uses] == [1, 2, 3]
        assert all(0 < u.requests_reset <= 60 for u in uses)
        before = await store.list_ledger(user.id)
        with pytest.raises(RateLimitExceeded) as caught:
            await store.admit(reservation(user, key_id), limits)
        assert caught.value.limit == "requests_per_minute"
        assert caught.value.allowed == 3
        assert 0 < caught.value.retry_after <= 60
        assert await store.list_ledger(user.id) == before  # a refusal writes nothing
        # Other keys have their own minute.
        other = await store.create_api_key(user.id, "other", "sk-cg-other", "hash-other")
        await store.admit(reservation(user, other.id), limits)

    @pytest.mark.asyncio
    async def test_admit_counts_tokens_of_settled_requests(self, store: Store) -> None:
        user, key_id = await self.keyed_user(store)
        limits = RateLimits(tokens_per_minute=100)
        entry, _ = await store.admit(reservation(user, key_id, prompt_tokens=20), limits)
        await store.settle_ledger(
            entry.id, LedgerSettlement(amount=-5, prompt_tokens=20, completion_tokens=60)
        )
        _, use = await store.admit(reservation(user, key_id, prompt_tokens=20), limits)
        assert use.tokens == 100
        with pytest.raises(RateLimitExceeded) as caught:
            await store.admit(reservation(user, key_id, prompt_tokens=1), limits)
        assert caught.value.limit == "tokens_per_minute"

    @pytest.mark.asyncio
    async def test_settling_frees_a_concurrency_slot(self, store: Store) -> None:
        user, key_id = await self.keyed_user(store)
        limits = RateLimits(concurrent_requests=1)
        entry, _ = await store.admit(reservation(user, key_id), limits)
        with pytest.raises(RateLimitExceeded) as caught:
            await store.admit(reservation(user, key_id), limits)
        assert caught.value.limit == "concurrent_requests"
        await store.settle_ledger(entry.id, LedgerSettlement(amount=-3))
        await store.admit(reservation(user, key_id), limits)

    @pytest.mark.asyncio
    async def test_a_reservation_released_unsent_leaves_the_minute(self, store: Store) -> None:
        # Billing.release(uncount=True): one of OpenAI's n given back because a sibling was refused.
        user, key_id = await self.keyed_user(store)
        limits = RateLimits(requests_per_minute=1, tokens_per_minute=20)
        entry, _ = await store.admit(reservation(user, key_id, prompt_tokens=20), limits)
        released = await store.settle_ledger(
            entry.id, LedgerSettlement(amount=0, kind="released", outcome="not_sent")
        )
        assert (released.kind, released.amount, released.outcome) == ("released", 0, "not_sent")
        _, use = await store.admit(reservation(user, key_id, prompt_tokens=20), limits)
        assert (use.requests, use.tokens) == (1, 20)  # only the one just admitted

    @pytest.mark.asyncio
    async def test_admit_still_checks_the_balance(self, store: Store) -> None:
        user, key_id = await self.keyed_user(store, balance=15)
        await store.admit(reservation(user, key_id, amount=10), RateLimits())
        with pytest.raises(InsufficientBalance):
            await store.admit(reservation(user, key_id, amount=10), RateLimits())
        assert (await store.get_user(user.id)).balance == 5

    @pytest.mark.asyncio
    async def test_concurrent_admits_across_two_instances_keep_the_limit_exactly(
        self, store: Store, connect_store: OpenStore
    ) -> None:
        other = await connect_store()
        user, key_id = await self.keyed_user(store)
        limits = RateLimits(concurrent_requests=5, requests_per_minute=40)
        results = await asyncio.gather(
            *((store, other)[i % 2].admit(reservation(user, key_id), limits) for i in range(30)),
            return_exceptions=True,
        )
        admitted = [r for r in results if isinstance(r, tuple)]
        refused = [r for r in results if isinstance(r, RateLimitExceeded)]
        assert (len(admitted), len(refused)) == (5, 25)
        assert sorted(use.concurrent for _, use in admitted) == [1, 2, 3, 4, 5]

    @pytest.mark.asyncio
    async def test_usage_without_a_key_is_counted_per_user_apart_from_keys(self, store: Store) -> None:
        user, key_id = await self.keyed_user(store, balance=0)
        other = await store.ensure_user("other@example.com")
        limits = RateLimits(requests_per_minute=2, concurrent_requests=5)
        uses = [(await store.admit(keyless(user, prompt_tokens=5), limits))[1] for _ in range(2)]
        assert [(u.requests, u.tokens, u.concurrent) for u in uses] == [(1, 5, 1), (2, 10, 2)]
        assert all(0 < u.requests_reset <= 60 for u in uses)
        before = await store.list_ledger(user.id)
        with pytest.raises(RateLimitExceeded) as caught:
            await store.admit(keyless(user), limits)
        assert (caught.value.limit, caught.value.allowed) == ("requests_per_minute", 2)
        assert 0 < caught.value.retry_after <= 60
        assert await store.list_ledger(user.id) == before  # a refusal writes nothing
        # The user's keys and other users count apart: neither takes from the other.
        await store.admit(reservation(user, key_id, amount=0), RateLimits(requests_per_minute=1))
        _, use = await store.admit(keyless(other), limits)
        assert use.requests == 1
        # A top-up is not usage.
        await store.post_ledger(LedgerDraft(user_id=other.id, amount=5, kind="topup"))
        assert (await store.admit(keyless(other), limits))[1].requests == 2

    @pytest.mark.asyncio
    async def test_tokens_per_day_refuses_once_the_days_tokens_reach_it(self, store: Store) -> None:
        user = await store.ensure_user("daily@example.com")
        # The first request is admitted whatever its size: nothing was used yet today.
        entry, _ = await store.admit(keyless(user, prompt_tokens=80), RateLimits(), tokens_per_day=50)
        settled = LedgerSettlement(amount=0, prompt_tokens=30, completion_tokens=15)
        await store.settle_ledger(entry.id, settled)
        entry, use = await store.admit(keyless(user, prompt_tokens=10), RateLimits(), tokens_per_day=50)
        assert use.tokens == 55
        await store.settle_ledger(entry.id, LedgerSettlement(amount=0, prompt_tokens=10, completion_tokens=0))
        before = await store.list_ledger(user.id)
        with pytest.raises(RateLimitExceeded) as caught:
            await store.admit(keyless(user, prompt_tokens=1), RateLimits(), tokens_per_day=50)
        assert (caught.value.limit, caught.value.allowed) == ("tokens_per_day", 50)
        # It frees up when the first request's tokens are a day old (the second's alone are under).
        assert 24 * 3600 - 60 < caught.value.retry_after <= 24 * 3600
        assert await store.list_ledger(user.id) == before
        await store.admit(keyless(user), RateLimits(), tokens_per_day=56)
        user2, key_id = await self.keyed_user(store)
        with pytest.raises(ValueError, match="tokens_per_day"):
            await store.admit(reservation(user2, key_id), RateLimits(), tokens_per_day=50)

    @pytest.mark.asyncio
    async def test_usage_by_day_sums_settled_charges_per_key(self, store: Store) -> None:
        user, key_id = await self.keyed_user(store)
        other = await store.create_api_key(user.id, "other", "sk-cg-other", "hash-other")
        for key, prompt, completion, cost in ((key_id, 10, 20, 7), (key_id, 1, 2, 3), (other.id, 5, 5, 4)):
            entry, _ = await store.admit(reservation(user, key), RateLimits())
            settlement = LedgerSettlement(amount=-cost, prompt_tokens=prompt, completion_tokens=completion)
            await store.settle_ledger(entry.id, settlement)
        await store.admit(reservation(user, key_id), RateLimits())  # in flight: not usage yet
        since = datetime.now(UTC) - timedelta(days=1)
        rows = await store.usage_by_day(since)
        today = datetime.now(UTC).date().isoformat()
        assert [
            (r.day, r.key_id, r.requests, r.prompt_tokens, r.completion_tokens, r.cost) for r in rows
        ] == [
            (today, key_id, 2, 11, 22, 10),
            (today, other.id, 1, 5, 5, 4),
        ]
        assert [r.key_id for r in await store.usage_by_day(since, key_id=other.id)] == [other.id]
        assert await store.usage_by_day(since, user_id=user.id + 1000) == []
        assert await store.usage_by_day(datetime.now(UTC) + timedelta(days=1)) == []

    @pytest.mark.asyncio
    async def test_stale_reservations_are_the_unsettled_ones_no_running_reply_holds(
        self, store: Store
    ) -> None:
        user, key_id = await self.keyed_user(store)
        free, _ = await store.admit(reservation(user, key_id), RateLimits())
        held, _ = await store.admit(reservation(user, key_id), RateLimits())
        settled, _ = await store.admit(reservation(user, key_id), RateLimits())
        await store.settle_ledger(settled.id, LedgerSettlement(amount=-1))
        conversation = await store.create_conversation(user.id, "test")
        draft = MessageDraft(role="assistant", status="generating", ledger_id=held.id)
        await store.append_message(conversation.id, draft)
        await tick()
        later = datetime.now(UTC) + timedelta(seconds=1)
        assert [e.id for e in await store.stale_reservations(later)] == [free.id]
        assert await store.stale_reservations(free.created_at) == []
        # A reply that ended (or was marked interrupted) without settling holds it no more.
        ended, _ = await store.admit(reservation(user, key_id), RateLimits())
        reply = await store.append_message(
            conversation.id, MessageDraft(role="assistant", status="generating", ledger_id=ended.id)
        )
        await store.update_message(reply.id, MessagePatch(status="interrupted"))
        later = datetime.now(UTC) + timedelta(seconds=1)
        assert [e.id for e in await store.stale_reservations(later)] == [free.id, ended.id]


class LeaseConformance(StoreConformance):
    """Tests a store that offers leases passes: everything :class:`StoreConformance` asks,
    and what :class:`~core.store.LeaseStore` promises beyond it.

    A store without leases subclasses :class:`StoreConformance` alone.
    """

    @pytest_asyncio.fixture
    async def store(self, connect_store: OpenStore) -> LeaseStore:
        store = await connect_store()
        assert isinstance(store, LeaseStore), f"{type(store).__name__} offers no leases: use StoreConformance"
        return store

    @pytest.mark.asyncio
    async def test_a_lease_counts_as_its_requests_tokens_and_slots(self, store: LeaseStore) -> None:
        user, key_id = await self.keyed_user(store)
        entry, use = await store.admit(lease(user, key_id, 4, tokens=40), RateLimits(requests_per_minute=6))
        assert (entry.kind, entry.requests, entry.amount) == ("lease", 4, -100)
        assert (use.requests, use.tokens, use.concurrent) == (4, 40, 4)
        with pytest.raises(RateLimitExceeded) as caught:
            await store.admit(lease(user, key_id, 3), RateLimits(requests_per_minute=6))
        assert caught.value.limit == "requests_per_minute"
        with pytest.raises(RateLimitExceeded) as caught:
            await store.admit(reservation(user, key_id), RateLimits(concurrent_requests=4))
        assert caught.value.limit == "concurrent_requests"
        _, use = await store.admit(reservation(user, key_id), RateLimits(requests_per_minute=6))
        assert (use.requests, use.tokens, use.concurrent) == (5, 45, 5)
        # What the lease holds is not spent: the user still has it.
        assert (await store.get_user(user.id)).balance == 1_000_000 - 10

    @pytest.mark.asyncio
    async def test_charges_draw_on_their_lease_and_count_their_real_tokens(self, store: LeaseStore) -> None:
        user, key_id = await self.keyed_user(store)
        entry, _ = await store.admit(lease(user, key_id, 4, amount=100, tokens=40), RateLimits())
        charges = [
            LedgerDraft(user_id=user.id, amount=-30, kind="charge", key_id=key_id, model="m",
                        prompt_tokens=9, completion_tokens=21, latency_ms=5, outcome="complete"),
            LedgerDraft(user_id=user.id, amount=0, kind="charge", key_id=key_id, outcome="not_sent"),
        ]  # fmt: skip
        assert await store.charge_lease(entry.id, charges, counted_tokens=20) == 1_000_000 - 100
        entries = await store.list_ledger(user.id)
        posted = [e for e in entries if e.kind == "charge"]
        assert [(e.amount, e.prompt_tokens, e.completion_tokens, e.outcome, e.key_id) for e in posted] == [
            (0, 0, 0, "not_sent", key_id),
            (-30, 9, 21, "complete", key_id),
        ]
        assert all(e.balance_after == 1_000_000 - 100 and e.requests == 1 for e in posted)
        held = await store.get_ledger_entry(entry.id)
        assert (held.kind, held.amount) == ("lease", -70)
        assert (await store.get_user(user.id)).balance == 1_000_000 - 30
        assert ledger_total(entries) == 1_000_000 - 100  # the stored balance, lease included
        # The window counted 40 tokens for the lease; these two used 30 where 20 were counted.
        _, use = await store.admit(reservation(user, key_id, prompt_tokens=0), RateLimits())
        assert (use.requests, use.tokens) == (5, 50)
        # Usage beyond what the lease holds was spent all the same: it comes from the balance.
        over = [LedgerDraft(user_id=user.id, amount=-90, kind="charge", key_id=key_id)]
        assert await store.charge_lease(entry.id, over, counted_tokens=0) == 1_000_000 - 100 - 10 - 20
        assert (await store.get_ledger_entry(entry.id)).amount == 0
        assert (await store.get_user(user.id)).balance == 1_000_000 - 120 - 10  # and the reservation

    @pytest.mark.asyncio
    async def test_releasing_a_lease_gives_back_what_it_did_not_use(self, store: LeaseStore) -> None:
        user, key_id = await self.keyed_user(store)
        limits = RateLimits(requests_per_minute=5, tokens_per_minute=100, concurrent_requests=4)
        entry, _ = await store.admit(lease(user, key_id, 4, amount=100, tokens=80), limits)
        charges = [LedgerDraft(user_id=user.id, amount=-25, kind="charge", key_id=key_id, prompt_tokens=10)]
        await store.charge_lease(entry.id, charges, counted_tokens=20)
        with pytest.raises(RateLimitExceeded):
            await store.admit(reservation(user, key_id, prompt_tokens=50), limits)
        released = await store.release_lease(entry.id, unused_requests=3, unused_tokens=60)
        assert (released.kind, released.amount, released.balance_after) == ("released", 0, 1_000_000 - 25)
        assert released.outcome == "released"  # no longer "open"
        assert (await store.get_user(user.id)).balance == 1_000_000 - 25
        entries = await store.list_ledger(user.id)
        assert ledger_total(entries) == 1_000_000 - 25
        # One request and its 10 tokens were used; the rest left the minute, and its slots are free.
        _, use = await store.admit(reservation(user, key_id, prompt_tokens=50), limits)
        assert (use.requests, use.tokens, use.concurrent) == (2, 60, 1)
        assert await store.release_lease(entry.id, 3, 60) == released  # again: nothing changes
        assert (await store.get_user(user.id)).balance == 1_000_000 - 25 - 10
        with pytest.raises(StoreError, match=str(entry.id)):
            await store.charge_lease(entry.id, charges, counted_tokens=0)
        with pytest.raises(StoreError, match="not a lease"):
            await store.release_lease(entries[-1].id, 0, 0)  # the top-up

    @pytest.mark.asyncio
    async def test_shrinking_a_lease_keeps_only_the_requests_still_running(self, store: LeaseStore) -> None:
        user, key_id = await self.keyed_user(store)
        entry, _ = await store.admit(lease(user, key_id, 4, amount=100, tokens=80), RateLimits())
        await store.shrink_lease(entry.id, 1, unused_requests=2, unused_tokens=40, unused_amount=50)
        shrunk = await store.get_ledger_entry(entry.id)
        assert (shrunk.kind, shrunk.amount, shrunk.requests) == ("lease", -50, 1)
        assert ledger_total(await store.list_ledger(user.id)) == 1_000_000 - 50
        _, use = await store.admit(reservation(user, key_id, prompt_tokens=0), RateLimits())
        assert (use.requests, use.tokens, use.concurrent) == (3, 40, 2)
        await store.shrink_lease(entry.id, 1, 0, 0, unused_amount=80)  # never more than it holds
        assert (await store.get_ledger_entry(entry.id)).amount == 0
        await store.release_lease(entry.id, 0, 0)
        await store.shrink_lease(entry.id, 1, 1, 1, 1)  # released: left as it is
        assert (await store.get_ledger_entry(entry.id)).kind == "released"
        assert ledger_total(await store.list_ledger(user.id)) == (await store.get_user(user.id)).balance + 0

    @pytest.mark.asyncio
    async def test_a_lease_checks_the_balance_like_a_reservation(self, store: LeaseStore) -> None:
        user, key_id = await self.keyed_user(store, balance=150)
        with pytest.raises(InsufficientBalance):
            await store.admit(lease(user, key_id, 4, amount=200), RateLimits())
        await store.admit(lease(user, key_id, 4, amount=150), RateLimits())
        assert (await store.get_user(user.id)).balance == 150
        with pytest.raises(InsufficientBalance):
            await store.admit(reservation(user, key_id, amount=1), RateLimits())

    @pytest.mark.asyncio
    async def test_an_open_lease_left_long_enough_is_stale(self, store: LeaseStore) -> None:
        user, key_id = await self.keyed_user(store)
        open_, _ = await store.admit(lease(user, key_id, 4), RateLimits())
        done, _ = await store.admit(lease(user, key_id, 4), RateLimits())
        await store.release_lease(done.id, 4, 50)
        await tick()
        later = datetime.now(UTC) + timedelta(seconds=1)
        assert [e.id for e in await store.stale_reservations(later)] == [open_.id]
