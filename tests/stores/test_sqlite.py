"""The SQLite store: the conformance suite with leases, plus what only SQLite has (pragmas, migrations)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import sys
import textwrap
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest

from core import LedgerDraft, MessageDraft, RateLimits, Store, utcnow
from core.errors import StoreError
from core.testing.cluster_suite import ClusterConformance, Vanish
from core.testing.store_suite import LeaseConformance, OpenStore
from stores.sqlite import SqliteStore, register_stores
from stores.sqlite.schema import LATEST_VERSION, MIGRATIONS, migrate


def sqlite_store(path: Path) -> SqliteStore:
    return SqliteStore("sqlite", SqliteStore.Options(path=str(path)))


class TestSqliteConformance(LeaseConformance):
    @pytest.fixture
    def open_store(self, tmp_path: Path) -> OpenStore:
        async def open_store() -> Store:
            store = sqlite_store(tmp_path / "chatgate.db")
            await store.open()
            return store

        return open_store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = sqlite_store(tmp_path / "chatgate.db")
    await store.open()
    yield store
    await store.aclose()


def connect(path: Path) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(path, isolation_level=None))


async def user_version(path: Path) -> int:
    with connect(path) as conn:
        [(version,)] = conn.execute("PRAGMA user_version").fetchall()
        return int(version)


def test_registers_itself() -> None:
    assert register_stores() == [SqliteStore]
    assert SqliteStore.name == "sqlite"


def test_options_forbid_unknown_fields() -> None:
    assert msgspec.convert({}, SqliteStore.Options) == SqliteStore.Options("chatgate.db", 5000)
    with pytest.raises(msgspec.ValidationError, match="pathh"):
        msgspec.convert({"pathh": "x.db"}, SqliteStore.Options)


@pytest.mark.parametrize("path", [":memory:", ""])
def test_in_memory_database_is_rejected(path: str) -> None:
    with pytest.raises(ValueError, match="path to name a file"):
        SqliteStore("sqlite", SqliteStore.Options(path=path))


async def test_pragmas(store: SqliteStore) -> None:
    async def pragma(name: str) -> object:
        [(value,)] = await store._read(lambda db: db.execute(f"PRAGMA {name}").fetchall())
        return value

    assert await pragma("journal_mode") == "wal"
    assert await pragma("foreign_keys") == 1
    assert await pragma("busy_timeout") == 5000
    assert await pragma("synchronous") == 1  # NORMAL


async def test_fresh_database_is_at_latest_version(store: SqliteStore, tmp_path: Path) -> None:
    assert LATEST_VERSION == len(MIGRATIONS) == 11
    assert await user_version(tmp_path / "chatgate.db") == LATEST_VERSION


async def test_creates_parent_directory_and_resolves_relative_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = SqliteStore("sqlite", SqliteStore.Options(path="data/nested/chat.db"))
    monkeypatch.chdir("/")  # the path was fixed when the store was configured
    await store.open()
    await store.aclose()
    assert (tmp_path / "data" / "nested" / "chat.db").is_file()
    assert store.path == tmp_path / "data/nested/chat.db"
    assert store.describe() == {"plugin": "sqlite"}  # /healthz is anonymous: no filesystem paths


async def test_version_1_database_upgrades_keeping_data(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with connect(path) as conn:
        assert migrate(conn, target=1) == 1
        conn.execute("INSERT INTO users (id, email, balance, created_at) VALUES (1, 'a@b.c', 5, 0)")
        conn.execute(
            "INSERT INTO conversations (id, user_id, kind, name, favorite, created_at, updated_at)"
            " VALUES (7, 1, 'topic', 'old talk', 1, 1000, 2000)"
        )
    assert await user_version(path) == 1

    store = sqlite_store(path)
    await store.open()
    try:
        conversation = await store.get_conversation(7)
        user = await store.get_user(1)
    finally:
        await store.aclose()
    assert await user_version(path) == LATEST_VERSION
    assert (conversation.name, conversation.favorite, conversation.user_id) == ("old talk", True, 1)
    assert (conversation.summary, conversation.summary_until) == ("", None)
    assert conversation.updated_at.timestamp() == 2.0
    assert (user.email, user.balance) == ("a@b.c", 5)


async def test_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with connect(path) as conn:
        migrate(conn)
        conn.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    store = sqlite_store(path)
    found, supported = LATEST_VERSION + 1, LATEST_VERSION
    expected = (
        rf"{re.escape(str(path))} is at schema version {found}.*up to version {supported}.*upgrade chatgate"
    )
    with pytest.raises(StoreError, match=expected):
        await store.open()
    assert await user_version(path) == LATEST_VERSION + 1
    with connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchall() == [("delete",)]
    with pytest.raises(StoreError, match="not open"):
        await store.ping()


async def test_workers_opening_a_fresh_file_together_migrate_once(tmp_path: Path) -> None:
    stores = [sqlite_store(tmp_path / "shared.db") for _ in range(4)]
    await asyncio.gather(*(store.open() for store in stores))
    try:
        users = await asyncio.gather(*(store.ensure_user("x@example.com") for store in stores))
        assert len({user.id for user in users}) == 1
    finally:
        for store in stores:
            await store.aclose()
    assert await user_version(tmp_path / "shared.db") == LATEST_VERSION


async def test_failed_write_rolls_back(store: SqliteStore) -> None:
    user = await store.ensure_user("a@example.com")
    await store.create_api_key(user.id, "k", "cg-1", "hash-1")
    with pytest.raises(StoreError, match="already exists"):
        await store.create_api_key(user.id, "k2", "cg-2", "hash-1")
    # The connection is usable and not stuck inside the failed transaction.
    assert len(await store.list_api_keys()) == 1
    await store.create_api_key(user.id, "k3", "cg-3", "hash-3")


async def test_cancelled_writes_leave_the_store_consistent(store: SqliteStore) -> None:
    user = await store.ensure_user("a@example.com")
    for step in range(20):
        # Cancel at varying points: while BEGIN, the writes or COMMIT are queued.
        task = asyncio.create_task(store.post_ledger(LedgerDraft(user_id=user.id, amount=1, kind="topup")))
        await asyncio.sleep(step * 0.0002)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    last = await store.post_ledger(LedgerDraft(user_id=user.id, amount=1, kind="topup"))
    ledger = await store.list_ledger(user.id)
    assert (
        sum(entry.amount for entry in ledger) == last.balance_after == (await store.get_user(user.id)).balance
    )


async def test_interrupt_cutoff_below_a_millisecond(store: SqliteStore) -> None:
    user = await store.ensure_user("a@example.com")
    conversation = await store.create_conversation(user.id, "topic")
    message = await store.append_message(conversation.id, MessageDraft(role="assistant", status="generating"))
    assert await store.interrupt_stale_generations(message.updated_at) == []
    assert len(await store.interrupt_stale_generations(message.updated_at + timedelta(microseconds=1))) == 1
    assert (await store.get_message(message.id)).updated_at <= utcnow()


WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from core import LedgerDraft
    from stores.sqlite import SqliteStore

    async def main(path, user_id):
        store = SqliteStore("sqlite", SqliteStore.Options(path=path))
        await store.open()
        try:
            charge = LedgerDraft(user_id=user_id, amount=-7, kind="charge")
            await asyncio.gather(*(store.post_ledger(charge) for _ in range(25)))
        finally:
            await store.aclose()

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


async def test_worker_processes_share_the_file(store: SqliteStore) -> None:
    user = await store.ensure_user("a@example.com")
    await store.post_ledger(LedgerDraft(user_id=user.id, amount=1000, kind="topup"))
    workers = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", WORKER, str(store.path), str(user.id))
        for _ in range(3)
    ]
    codes = await asyncio.gather(*(worker.wait() for worker in workers))
    assert codes == [0, 0, 0]
    ledger = await store.list_ledger(user.id)
    assert (await store.get_user(user.id)).balance == 1000 - 3 * 25 * 7
    assert sorted(entry.balance_after for entry in ledger) == [1000 - 7 * k for k in range(75, -1, -1)]


async def test_calls_grouped_in_one_transaction_stay_atomic_each(store: SqliteStore) -> None:
    user = await store.ensure_user("a@example.com")

    def credit(db: sqlite3.Connection, amount: int, fail: bool) -> int:
        db.execute("UPDATE users SET balance = balance + ? WHERE id = ?", (amount, user.id))
        if fail:
            raise ValueError("this call fails after writing")
        [(balance,)] = db.execute("SELECT balance FROM users WHERE id = ?", (user.id,)).fetchall()
        return int(balance)

    # Queued together, so the store's thread runs them as one group.
    results = await asyncio.gather(
        *(store._write(credit, 10**k, k % 2 == 1) for k in range(6)), return_exceptions=True
    )
    failed = [r for r in results if isinstance(r, ValueError)]
    assert len(failed) == 3
    assert (await store.get_user(user.id)).balance == 1 + 100 + 10_000  # only the calls that succeeded
    assert [r for r in results if isinstance(r, int)] == [1, 101, 10_101]


async def test_a_lone_call_that_fails_after_writing_leaves_nothing(store: SqliteStore) -> None:
    user = await store.ensure_user("a@example.com")

    def credit_then_fail(db: sqlite3.Connection) -> None:
        db.execute("UPDATE users SET balance = balance + 5 WHERE id = ?", (user.id,))
        raise ValueError("this call fails after writing")

    # One call at a time: each is its transaction's only call (no savepoint around it).
    for _ in range(3):
        with pytest.raises(ValueError, match="after writing"):
            await store._write(credit_then_fail)
        assert (await store.get_user(user.id)).balance == 0
    assert (await store.post_ledger(LedgerDraft(user_id=user.id, amount=2, kind="topup"))).balance_after == 2


async def test_seconds_that_left_the_minute_neither_count_nor_stay(store: SqliteStore) -> None:
    user = await store.ensure_user("a@example.com")
    key = await store.create_api_key(user.id, "k", "cg-1", "hash-1")
    await store.post_ledger(LedgerDraft(user_id=user.id, amount=100, kind="topup"))
    now = int(utcnow().timestamp())

    def seed(db: sqlite3.Connection) -> None:
        # The minute as another process left it: busy seconds long gone, and one recent.
        rows = [(key.id, now - age, 50, 500) for age in (3600, 120, 61)] + [(key.id, now - 10, 2, 20)]
        db.executemany("INSERT INTO rate_window VALUES (?, ?, ?, ?)", rows)

    def seconds(db: sqlite3.Connection) -> list[int]:
        return [now - row[0] for row in db.execute("SELECT second FROM rate_window ORDER BY second")]

    await store._write(seed)
    draft = LedgerDraft(user_id=user.id, amount=-1, kind="reservation", key_id=key.id, prompt_tokens=5)
    _, use = await store.admit(draft, RateLimits(requests_per_minute=3))
    assert (use.requests, use.tokens) == (3, 25)
    assert 49 <= use.requests_reset <= 51  # when the recent second leaves the minute
    assert await store._read(seconds) in ([10, 0], [10, -1])  # the old ones were pruned


async def test_a_closed_store_refuses_calls(tmp_path: Path) -> None:
    store = sqlite_store(tmp_path / "chatgate.db")
    await store.open()
    await store.aclose()
    with pytest.raises(StoreError, match="not open"):
        await store.list_users()
    await store.open()  # and opens again
    assert await store.list_users() == []
    await store.aclose()


async def test_every_message_column_but_revision_moves_the_revision(store: SqliteStore) -> None:
    """messages_changed lists the columns it watches: a column left out would change silently."""
    [(sql,)] = await store._read(
        lambda db: db.execute("SELECT sql FROM sqlite_master WHERE name = 'messages_changed'").fetchall()
    )
    watched = sql.split(" OF ", 1)[1].split(" ON messages", 1)[0]
    columns = {c.strip() for c in watched.split(",")}
    [*table] = await store._read(lambda db: db.execute("PRAGMA table_info(messages)").fetchall())
    assert columns == {row["name"] for row in table} - {"id", "revision"}


class TestSqliteCluster(ClusterConformance):
    @pytest.fixture
    def open_store(self, tmp_path: Path) -> OpenStore:
        async def open_store() -> Store:
            store = sqlite_store(tmp_path / "chatgate.db")
            await store.open()
            return store

        return open_store

    @pytest.fixture
    def vanish(self) -> Vanish:
        async def vanish(store: Store) -> None:
            # As a killed process: its socket closes, nothing is written on the way out.
            assert isinstance(store, SqliteStore)
            assert store._mailbox is not None
            store._mailbox.close()
            store._mailbox = None
            assert store._presence is not None
            store._presence.close(leave=False)  # the kernel releases a dead process's lock; the file stays
            store._presence = None

        return vanish
