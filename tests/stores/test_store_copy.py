"""``chatgate store copy``: everything a store holds, ids and all, into another store's empty one.

SQLite to PostgreSQL and back, through the real command: the copy holds the same rows
(dumped and as records), old keys, balances and topics work on a gateway serving it, and
new rows take ids after the copied ones (and after deleted ones).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core import (
    MICRO,
    ConversationPatch,
    CopyableStore,
    LeaseStore,
    LedgerDraft,
    LedgerSettlement,
    MessageDraft,
    MessagePatch,
    RateLimits,
    Store,
)
from core.services.accounts import Accounts, hash_key
from core.store_copy import StoreCopyError, copy_store
from core.testing.gateway import RunningGateway
from stores.postgres import PostgresStore
from stores.sqlite import SqliteOptions, SqliteStore
from tests.conftest import chatgate
from tests.postgres import Database
from tests.stores.test_leaseless import LeaselessStore


class Side:
    """One end of a copy: a configuration file and a way to open the store it names."""

    def __init__(self, config: Path, store: Callable[[], CopyableStore]) -> None:
        self.config = config
        self.store = store


@pytest.fixture
def sqlite_side(write_config: Callable[..., Path], tmp_path: Path) -> Callable[[str], Side]:
    def make(name: str) -> Side:
        path = tmp_path / f"{name}.db"
        config = write_config(
            replace={f'path = "{tmp_path / "chatgate.db"}"': f'path = "{path}"'}, name=f"{name}.toml"
        )
        return Side(config, lambda: SqliteStore("sqlite", SqliteStore.Options(path=str(path))))

    return make


@pytest.fixture
def postgres_side(
    write_config: Callable[..., Path], tmp_path: Path, postgres: Database
) -> Callable[[str], Side]:
    def make(name: str) -> Side:
        schema = postgres.schema()
        sqlite_section = f'[store]\nplugin = "sqlite"\npath = "{tmp_path / "chatgate.db"}"\n'
        config = write_config(replace={sqlite_section: postgres.store_section(schema)}, name=f"{name}.toml")
        options = PostgresStore.Options(dsn=postgres.dsn, schema=schema)
        return Side(config, lambda: PostgresStore("postgres", options))

    return make


async def opened(side: Side) -> CopyableStore:
    store = side.store()
    await store.open()
    return store


class Held(dict[str, Any]):
    """What :func:`populate` made, by name."""


async def populate(store: Store) -> Held:
    """Every kind of row: users, keys (with limits, revoked), top-up, charge, lease, reservation,
    the rate window, conversations with a summary, a favourite, messages, and deleted ones."""
    accounts = Accounts(store)
    key, secret = await accounts.create_key("Ann@Example.com", "laptop")
    key = await store.set_api_key_limits(key.id, RateLimits(60, 100_000, 4))
    ann = key.user_id
    await store.post_ledger(LedgerDraft(ann, 50 * MICRO, "topup", note="welcome"))
    reserved, _ = await store.admit(
        LedgerDraft(ann, -2 * MICRO, "reservation", key_id=key.id, model="mock-chat", prompt_tokens=10),
        RateLimits(),
    )
    await store.settle_ledger(
        reserved.id, LedgerSettlement(-MICRO, prompt_tokens=10, completion_tokens=20, latency_ms=30)
    )
    lease, _ = await store.admit(
        LedgerDraft(ann, -3 * MICRO, "lease", key_id=key.id, requests=5, prompt_tokens=100), RateLimits()
    )
    assert isinstance(store, LeaseStore)
    charge = LedgerDraft(ann, -MICRO // 2, "charge", key_id=key.id, model="mock-chat", prompt_tokens=5)
    await store.charge_lease(lease.id, [charge], counted_tokens=20)
    old, old_secret = await accounts.create_key("bob@example.com", "old")
    await store.revoke_api_key(old.id)
    bob = old.user_id

    topic = await store.create_conversation(ann, "topic", "Trip plans", series_id=1)
    question, answer = await store.append_messages(
        topic.id,
        [MessageDraft("user", "hello"), MessageDraft("assistant", "hi", reasoning="a greeting", model="m")],
    )
    await store.update_message(answer.id, MessagePatch(prompt_tokens=3, completion_tokens=4))
    await store.update_conversation(
        topic.id, ConversationPatch(favorite=True, summary="they said hello", summary_until=question.id)
    )
    # A reply being generated, holding its reservation.
    held, _ = await store.admit(
        LedgerDraft(ann, -MICRO, "reservation", key_id=key.id, model="mock-chat"), RateLimits()
    )
    await store.append_message(
        topic.id, MessageDraft("assistant", "partial", status="generating", ledger_id=held.id)
    )
    chat = await store.create_conversation(bob, "email")
    await store.append_message(chat.id, MessageDraft("user", "你好"))
    # The highest ids so far go with a deleted conversation: the copy must not hand them out again.
    gone = await store.create_conversation(bob, "topic", "deleted")
    [gone_message] = await store.append_messages(gone.id, [MessageDraft("user", "bye")])
    await store.delete_conversation(gone.id)
    return Held(
        secret=secret,
        old_secret=old_secret,
        users=[ann, bob],
        topic=topic.id,
        gone=gone.id,
        gone_message=gone_message.id,
    )


async def dumped(store: CopyableStore) -> dict[str, list[dict[str, Any]]]:
    return {table: [row async for rows in store.dump(table) for row in rows] for table in store.TABLES}


async def records(store: Store, held: Held) -> dict[str, Any]:
    """Everything the store API shows of the populated rows."""
    conversations = [c for user in held["users"] for c in await store.list_conversations(user)]
    return {
        "users": await store.list_users(),
        "keys": await store.list_api_keys(),
        "owner": await store.find_api_key_owner(hash_key(held["secret"])),
        "ledger": [await store.list_ledger(user, 1000) for user in held["users"]],
        "conversations": conversations,
        "messages": [await store.list_messages(c.id) for c in conversations],
    }


async def check_copy(source_side: Side, target_side: Side, gateway_factory: Callable[..., Any]) -> None:
    source = await opened(source_side)
    try:
        held = await populate(source)
        before, shown = await dumped(source), await records(source, held)
        totals = await source.totals()
    finally:
        await source.aclose()
    assert all(before.values()), "every table has rows to copy"
    assert sum(row["amount"] for row in before["ledger"]) == totals.ledger

    copied = chatgate("store", "copy", "--config", str(source_side.config), "--to", str(target_side.config))
    assert copied.returncode == 0, copied.stderr
    lines = copied.stdout.splitlines()
    assert lines[0].split() == ["TABLE", "ROWS"]
    counts = {line.split()[0]: int(line.split()[1]) for line in lines[1:-1]}
    assert counts == {table: len(rows) for table, rows in before.items()}
    assert lines[-1] == f"copied {sum(counts.values())} rows; balances match"

    target = await opened(target_side)
    try:
        assert await dumped(target) == before
        assert await records(target, held) == shown
        assert await target.totals() == totals

        # A second copy into it is refused, and writes nothing.
        again = chatgate(
            "store", "copy", "--config", str(source_side.config), "--to", str(target_side.config)
        )
        assert again.returncode == 1
        assert "the target store is not empty" in again.stderr
        assert await dumped(target) == before

        # Old keys and topics work on a gateway serving the copy (before anything else moves them).
        gateway: RunningGateway = await gateway_factory(target_side.config)
        models = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {held['secret']}"})
        assert models.status_code == 200
        revoked = await gateway.client.get("/v1/models", headers={"X-API-Key": held["old_secret"]})
        assert revoked.status_code == 401
        topic = await gateway.client.get(
            f"/chat/topic/{held['topic']}", headers={"X-API-Key": held["secret"]}
        )
        assert topic.status_code == 200, topic.text
        assert (topic.json()["name"], topic.json()["favorite"]) == ("Trip plans", True)

        # New rows take ids after every copied one, and after the deleted conversation's.
        ann, bob = held["users"]
        conversation = await target.create_conversation(bob, "topic", "new")
        assert conversation.id == held["gone"] + 1
        message = await target.append_message(conversation.id, MessageDraft("user", "again"))
        assert message.id == held["gone_message"] + 1
        entry = await target.post_ledger(LedgerDraft(ann, MICRO, "topup"))
        assert entry.id == max(row["id"] for row in before["ledger"]) + 1
        user = await target.ensure_user("carol@example.com")
        assert user.id == max(held["users"]) + 1
    finally:
        await target.aclose()


async def test_sqlite_to_postgres(sqlite_side, postgres_side, gateway_factory) -> None:
    await check_copy(sqlite_side("source"), postgres_side("target"), gateway_factory)


async def test_postgres_to_sqlite(sqlite_side, postgres_side, gateway_factory) -> None:
    await check_copy(postgres_side("source"), sqlite_side("target"), gateway_factory)


async def test_a_copy_into_a_store_with_rows_is_refused_and_writes_nothing(sqlite_side) -> None:
    source_side, target_side = sqlite_side("source"), sqlite_side("target")
    source, target = await opened(source_side), await opened(target_side)
    try:
        await Accounts(source).create_key("ann@example.com")
        await target.ensure_user("someone@example.com")
        before = await dumped(target)
        with pytest.raises(StoreCopyError, match="the target store is not empty"):
            await copy_store(source, target)
        assert await dumped(target) == before
    finally:
        await source.aclose()
        await target.aclose()


async def test_a_store_that_cannot_be_copied_is_named(sqlite_side, tmp_path: Path) -> None:
    target = await opened(sqlite_side("target"))
    try:
        leaseless = LeaselessStore("leaseless", SqliteOptions(path=str(tmp_path / "other.db")))
        with pytest.raises(StoreCopyError, match=r"the source store \(plugin 'leaseless'\) cannot be copied"):
            await copy_store(leaseless, target)
        assert await target.is_empty()
    finally:
        await target.aclose()


async def test_tables_larger_than_a_batch_are_copied_whole(
    sqlite_side, postgres_side, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stores.postgres import copying as postgres_copying
    from stores.sqlite import copying as sqlite_copying

    monkeypatch.setattr(sqlite_copying, "BATCH", 2)
    monkeypatch.setattr(postgres_copying, "BATCH", 2)
    source, target = await opened(sqlite_side("source")), await opened(postgres_side("target"))
    try:
        await populate(source)
        reported: list[tuple[str, int]] = []
        copied = await copy_store(
            source, target, progress=lambda table, count: reported.append((table, count))
        )
        before = await dumped(source)
        assert copied == {table: len(rows) for table, rows in before.items()}
        assert [count for table, count in reported if table == "messages"] == [2, 4]
        assert await dumped(target) == before
    finally:
        await source.aclose()
        await target.aclose()
