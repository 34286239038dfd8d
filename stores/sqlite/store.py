"""The SQLite store: one file shared by every worker process.

Each store instance owns two connections, each on a thread of its own
(:class:`~stores.sqlite.worker.SqliteWorker`): one for writes, one for reads
(in WAL mode a reader never waits for a writer). Every store call is one plain
function run there (:mod:`.accounts`, :mod:`.ledger`, :mod:`.conversations`),
and calls that queue up together share one transaction (group commit), each
atomic in a savepoint of its own (a call alone is its transaction's only call
and needs none). (An async driver that hopped to its thread per statement spent
more time hopping than SQLite spent working.) Groups that write start with
``BEGIN IMMEDIATE``, so that processes sharing the file wait for SQLite's
write lock instead of deadlocking while upgrading a read lock, and before that
take their turn on ``<path>-lock`` (:mod:`.write_lock`): SQLite alone lets a
writer wait past any timeout while the others write. The schema moves forward
through :data:`.schema.MIGRATIONS`, tracked in ``PRAGMA user_version``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from core import (
    MAX_SIGNAL_BYTES,
    MICRO,
    ApiKey,
    ClusterStore,
    Conversation,
    ConversationPatch,
    CopyableStore,
    LeaseStore,
    LedgerDraft,
    LedgerEntry,
    LedgerSettlement,
    Message,
    MessageDraft,
    MessagePatch,
    RateLimits,
    RateUse,
    Receiver,
    StandingWatcher,
    StoreError,
    StoreTotals,
    UsageDay,
    User,
)

from . import accounts, cluster, conversations, copying, ledger
from .rows import EPOCH, MS, all_of, assigned, by_id, fetch, first, now_ms, to_ms, update_one, write_one
from .schema import migrate, schema_version
from .worker import SqliteWorker
from .write_lock import WriteLock

_T = TypeVar("_T")


class SqliteOptions(msgspec.Struct, forbid_unknown_fields=True):
    """Options of the sqlite store.

    ``path`` is the database file, relative to the working directory; every
    worker must name the same file. chatgate's processes take turns to
    write, queued on ``<path>-lock`` beside it (:mod:`.write_lock`), without
    a time limit; ``busy_timeout_ms`` is how long a write waits for another
    program holding SQLite's write lock (the ``sqlite3`` shell) before failing.
    """

    path: str = "chatgate.db"
    busy_timeout_ms: int = 5000

    def __post_init__(self) -> None:
        # Validated here so `chatgate check` reports it as a configuration problem.
        if self.path.strip() in ("", ":memory:"):
            # Each connection to an in-memory database is a separate database,
            # so workers (and two store instances) would silently diverge.
            raise ValueError(f"path to name a file all workers share (it is {self.path!r})")
        if self.busy_timeout_ms < 0:
            raise ValueError(f"busy_timeout_ms to be >= 0 (it is {self.busy_timeout_ms})")


class SqliteStore(LeaseStore, CopyableStore, ClusterStore):
    """Keeps everything in one SQLite file, safe to share between worker processes.

    Promises beyond :class:`~core.store.LeaseStore`: WAL journal, foreign keys on,
    ``balance_after`` of a settled entry is the user's balance right after
    the settlement (not a rewrite of history), a database written by a newer
    chatgate is refused rather than touched, and every call is atomic: a
    caller cancelled before the store's thread took its call up writes
    nothing, one cancelled later does not stop it (it completes or fails as a
    whole). The rate window counts whole seconds:
    a request counts against its key's minute for 59 to 60 seconds.
    """

    name = "sqlite"
    Options = SqliteOptions

    def __init__(self, instance: str, options: SqliteOptions) -> None:
        super().__init__(instance, options)
        self.path = Path(options.path).absolute()
        self._worker: SqliteWorker | None = None
        self._reader: SqliteWorker | None = None
        self._opening = asyncio.Lock()
        self._owner: str | None = None  # this process's instance id, once it joined
        self._mailbox: cluster.Mailbox | None = None
        self._presence: cluster.Presence | None = None

    # lifecycle

    async def open(self) -> None:
        async with self._opening:  # two concurrent opens must not leak a connection
            if self._worker is not None:
                return
            worker = SqliteWorker()
            try:
                await worker.run("alone", self._attach)
            except (OSError, sqlite3.Error) as exc:
                await worker.stop()
                raise StoreError(
                    f"cannot open the SQLite database {self.path}: {exc}; "
                    "check [store] path and its permissions"
                ) from exc
            except BaseException:
                await worker.stop()
                raise
            # Reads get a connection and thread of their own: in WAL mode they never wait
            # for a write, so they should not queue behind one either.
            reader = SqliteWorker("chatgate-sqlite-reader")
            try:
                await reader.run("alone", self._attach)
            except BaseException:
                await reader.stop()
                await worker.run("alone", _detach)
                await worker.stop()
                raise
            self._worker, self._reader = worker, reader

    def _attach(self, worker: SqliteWorker) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = WriteLock(self.path.with_name(self.path.name + "-lock"))
        try:
            # Opening may switch the journal mode and migrate: writes, so it takes its turn too.
            with lock:
                worker.db = self._connect()
        except BaseException:
            lock.close()
            raise
        worker.write_lock = lock

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA busy_timeout = {int(self.options.busy_timeout_ms)}")
            # Before anything persistent (the journal mode is stored in the file),
            # so a database from a newer chatgate is left exactly as it was.
            schema_version(db, str(self.path))
            mode = self._enable_wal(db)
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: SQLite refused WAL journal mode (got {mode!r})")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA foreign_keys = ON")
            migrate(db)
        except BaseException:
            db.close()
            raise
        return db

    def _enable_wal(self, db: sqlite3.Connection) -> str:
        """Switch the file to WAL, retrying while another worker holds it.

        The switch needs an exclusive lock and SQLite may refuse it at once
        instead of waiting out ``busy_timeout`` (workers opening a fresh file
        together); the mode is stored in the file, so the first to succeed
        settles it for all. chatgate's own processes switch in turn (they hold
        :mod:`.write_lock`), so this waits only for other programs: an older
        chatgate, the ``sqlite3`` shell.
        """
        deadline = time.monotonic() + self.options.busy_timeout_ms / 1000
        while True:
            try:
                [(mode,)] = db.execute("PRAGMA journal_mode = WAL").fetchall()
                return str(mode)
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)  # on the store's own thread, never the event loop

    async def aclose(self) -> None:
        async with self._opening:
            if self._mailbox is not None:
                # Leaving: what it owned ended with its replies and leases (the services close first).
                self._mailbox.close()
                self._mailbox = None
                if self._presence is not None:
                    self._presence.close()
                    self._presence = None
                with contextlib.suppress(StoreError, sqlite3.Error):
                    await self._write(cluster.leave, self._owner)
                self._owner = None
            workers = [w for w in (self._reader, self._worker) if w is not None]
            self._worker = self._reader = None
            for worker in workers:
                # Calls queued before this one run first: the thread takes them in order.
                await worker.run("alone", _detach)
                await worker.stop()

    async def ping(self) -> None:
        await self._read(fetch, "SELECT 1")

    # users

    async def ensure_user(self, email: str) -> User:
        email = accounts.normal_email(email)
        if not email:
            raise ValueError("email must not be empty")
        return await self._write(accounts.ensure_user, email)

    async def get_user(self, user_id: int) -> User:
        return await self._read(accounts.user_by_id, user_id)

    async def find_user(self, email: str) -> User | None:
        return await self._read(
            first, User, f"{accounts.USERS} WHERE email = ?", (accounts.normal_email(email),)
        )

    async def list_users(self) -> list[User]:
        return await self._read(all_of, User, f"{accounts.USERS} ORDER BY id")

    # API keys

    async def create_api_key(self, user_id: int, name: str, prefix: str, key_hash: str) -> ApiKey:
        values = {"user_id": user_id, "name": name, "prefix": prefix, "key_hash": key_hash}
        return await self._write(accounts.create_api_key, values)

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        return await self._read(accounts.key_by_hash, key_hash)

    async def find_api_key_owner(self, key_hash: str) -> tuple[ApiKey, User] | None:
        return await self._read(accounts.key_and_owner, key_hash)

    async def list_api_keys(self, user_id: int | None = None) -> list[ApiKey]:
        if user_id is None:
            return await self._read(all_of, ApiKey, "SELECT * FROM api_keys ORDER BY id")
        return await self._read(
            all_of, ApiKey, "SELECT * FROM api_keys WHERE user_id = ? ORDER BY id", (user_id,)
        )

    async def revoke_api_key(self, key_id: int) -> ApiKey:
        # COALESCE keeps the first revocation time: revoking again changes nothing.
        sql = "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ? RETURNING *"
        return await self._write(write_one, ApiKey, sql, (now_ms(), key_id), "api key", key_id)

    async def set_api_key_limits(self, key_id: int, limits: RateLimits) -> ApiKey:
        sql = (
            "UPDATE api_keys SET requests_per_minute = ?, tokens_per_minute = ?, concurrent_requests = ? "
            "WHERE id = ? RETURNING *"
        )
        params = (limits.requests_per_minute, limits.tokens_per_minute, limits.concurrent_requests, key_id)
        return await self._write(write_one, ApiKey, sql, params, "api key", key_id)

    # ledger

    async def admit(
        self, draft: LedgerDraft, limits: RateLimits, *, floor: int = 0, tokens_per_day: int | None = None
    ) -> tuple[LedgerEntry, RateUse]:
        if draft.key_id is None:
            return await self._write(ledger.admit_keyless, draft, limits, floor, tokens_per_day, self._owner)
        if tokens_per_day is not None:
            raise ValueError("tokens_per_day applies to usage without a key only")
        return await self._write(ledger.admit, draft, limits, floor, self._owner)

    async def post_ledger(self, draft: LedgerDraft, *, floor: int | None = 0) -> LedgerEntry:
        return await self._write(ledger.post_ledger, draft, floor, self._owner)

    async def settle_ledger(self, entry_id: int, settlement: LedgerSettlement) -> LedgerEntry:
        return await self._write(ledger.settle_ledger, entry_id, settlement)

    async def usage_by_day(
        self, since: datetime, *, user_id: int | None = None, key_id: int | None = None
    ) -> list[UsageDay]:
        # Summed so that no stored value can overflow SQLite's integer sum (an error, not a
        # wrap): amounts exactly, in whole credits and micro-credits apart; token counts (an
        # upstream reports them) as floats, exact up to 2^53.
        sql = (
            "SELECT date(created_at / 1000, 'unixepoch') AS day, user_id, key_id, count(*) AS requests, "
            "CAST(total(prompt_tokens) AS INTEGER) AS prompt_tokens,"
            " CAST(total(completion_tokens) AS INTEGER) AS completion_tokens,"
            f" -sum(amount / {MICRO}) AS credits, -sum(amount % {MICRO}) AS micro"
            " FROM ledger WHERE kind = 'charge' AND created_at >= ?"
        )
        params: list[Any] = [to_ms(since)]
        if user_id is not None:
            sql += " AND user_id = ?"
            params.append(user_id)
        if key_id is not None:
            sql += " AND key_id = ?"
            params.append(key_id)
        sql += " GROUP BY day, user_id, key_id ORDER BY day, user_id, key_id"
        rows = await self._read(fetch, sql, params)
        return [
            UsageDay(day, user, key, requests, prompt, completion, credits * MICRO + micro)
            for day, user, key, requests, prompt, completion, credits, micro in rows
        ]

    async def stale_reservations(self, created_before: datetime) -> list[LedgerEntry]:
        sql = (
            "SELECT * FROM ledger WHERE kind IN ('reservation', 'lease') AND created_at < ?"
            " AND NOT EXISTS (SELECT 1 FROM messages WHERE messages.ledger_id = ledger.id"
            " AND messages.status = 'generating') ORDER BY id"
        )
        return await self._read(all_of, LedgerEntry, sql, (to_ms(created_before),))

    async def get_ledger_entry(self, entry_id: int) -> LedgerEntry:
        return await self._read(by_id, LedgerEntry, "ledger", entry_id, "ledger entry")

    async def list_ledger(self, user_id: int, limit: int = 100) -> list[LedgerEntry]:
        sql = "SELECT * FROM ledger WHERE user_id = ? ORDER BY id DESC LIMIT ?"
        return await self._read(all_of, LedgerEntry, sql, (user_id, limit))

    # leases (what makes this a LeaseStore)

    async def charge_lease(self, lease_id: int, charges: list[LedgerDraft], counted_tokens: int) -> int:
        return await self._write(ledger.charge_lease, lease_id, charges, counted_tokens)

    async def release_lease(self, lease_id: int, unused_requests: int, unused_tokens: int) -> LedgerEntry:
        return await self._write(ledger.release_lease, lease_id, unused_requests, unused_tokens)

    async def shrink_lease(
        self, lease_id: int, requests: int, unused_requests: int, unused_tokens: int, unused_amount: int
    ) -> None:
        await self._write(
            ledger.shrink_lease, lease_id, requests, unused_requests, unused_tokens, unused_amount
        )

    # conversations

    async def create_conversation(
        self, user_id: int, kind: str, name: str = "", series_id: int | None = None
    ) -> Conversation:
        values = {"user_id": user_id, "kind": kind, "name": name, "series_id": series_id}
        return await self._write(conversations.create_conversation, values)

    async def get_conversation(self, conversation_id: int) -> Conversation:
        return await self._read(by_id, Conversation, "conversations", conversation_id, "conversation")

    async def conversation_since(
        self, conversation_id: int, after_revision: int
    ) -> tuple[Conversation, list[Message]]:
        return await self._read(conversations.conversation_since, conversation_id, after_revision)

    async def list_conversations(
        self, user_id: int, kind: str | None = None, series_id: int | None = None
    ) -> list[Conversation]:
        filters: dict[str, Any] = {"user_id": user_id, "kind": kind, "series_id": series_id}
        filters = {column: value for column, value in filters.items() if value is not None}
        where = " AND ".join(f"{column} = ?" for column in filters)
        sql = f"SELECT * FROM conversations WHERE {where} ORDER BY id"
        return await self._read(all_of, Conversation, sql, list(filters.values()))

    async def update_conversation(self, conversation_id: int, patch: ConversationPatch) -> Conversation:
        values = {**assigned(patch), "updated_at": now_ms()}
        return await self._write(
            update_one, Conversation, "conversations", conversation_id, values, "conversation"
        )

    async def delete_conversation(self, conversation_id: int) -> Conversation:
        # Messages go with it through ON DELETE CASCADE.
        sql = "DELETE FROM conversations WHERE id = ? RETURNING *"
        return await self._write(
            write_one, Conversation, sql, (conversation_id,), "conversation", conversation_id
        )

    async def delete_stale_conversations(
        self, kind: str, updated_before: datetime, *, empty_only: bool = False
    ) -> int:
        # One statement; messages go with their conversations through ON DELETE CASCADE.
        # Stamps are whole milliseconds: stamp < cutoff exactly when stamp < it rounded up.
        cutoff = -((EPOCH - updated_before) // MS)
        sql = "DELETE FROM conversations WHERE kind = ? AND updated_at < ?"
        if empty_only:
            sql += " AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = conversations.id)"
        return await self._write(lambda db: db.execute(sql, (kind, cutoff)).rowcount)

    # messages

    async def append_message(self, conversation_id: int, draft: MessageDraft) -> Message:
        return await self._write(conversations.append_message, conversation_id, draft, self._owner)

    async def append_messages(self, conversation_id: int, drafts: list[MessageDraft]) -> list[Message]:
        return await self._write(conversations.append_messages, conversation_id, drafts, self._owner)

    async def update_message(self, message_id: int, patch: MessagePatch) -> Message:
        values = {**assigned(patch), "updated_at": now_ms()}
        if values.get("status") == "generating":  # a reply generated again belongs to this process
            values["owner"] = self._owner
        return await self._write(conversations.update_message, message_id, values)

    async def get_message(self, message_id: int) -> Message:
        return await self._read(by_id, Message, "messages", message_id, "message")

    async def list_messages(self, conversation_id: int) -> list[Message]:
        return await self._read(conversations.messages, conversation_id, -1)

    async def changed_messages(self, conversation_id: int, after_revision: int) -> list[Message]:
        return await self._read(conversations.messages, conversation_id, after_revision)

    async def interrupt_stale_generations(self, updated_before: datetime) -> list[Message]:
        # Stamps are whole milliseconds, so stamp < cutoff exactly when
        # stamp < the cutoff rounded up to a whole millisecond.
        cutoff = -((EPOCH - updated_before) // MS)
        messages = await self._write(conversations.interrupt_stale, cutoff)
        return sorted(messages, key=lambda m: m.id)

    # processes acting as one (what makes this a ClusterStore)

    async def join(self, receiver: Receiver, on_standing: StandingWatcher | None = None) -> str:
        # A process cannot lose the file it runs beside: on_standing is never called.
        if self._mailbox is not None:
            raise StoreError("this store instance already joined")
        instance = secrets.token_hex(8)
        # Alive before it is listed: a peer never finds a listed instance that was never alive.
        self._presence = cluster.Presence(self.path, instance)
        try:
            self._mailbox = cluster.Mailbox(self.path, instance, receiver)
            await self._write(cluster.register, instance, now_ms())
        except BaseException:
            if self._mailbox is not None:
                self._mailbox.close()
                self._mailbox = None
            self._presence.close()
            self._presence = None
            raise
        self._owner = instance
        return instance

    async def signal(self, message: str) -> None:
        mailbox = self._mailbox
        if mailbox is None:
            raise StoreError("join before signalling")
        if len(message.encode()) > MAX_SIGNAL_BYTES:
            raise ValueError(f"a signal is at most {MAX_SIGNAL_BYTES} bytes")
        for instance in await self._read(cluster.members):
            if instance != self._owner:
                mailbox.send(instance, message)

    async def recover(self) -> tuple[list[Message], list[LedgerEntry]]:
        replies: list[Message] = []
        entries: list[LedgerEntry] = []
        for instance in await self._read(cluster.members):
            if instance == self._owner or cluster.alive(self.path, instance):
                continue
            left = await self._write(cluster.take_over, instance, now_ms())
            cluster.forget(self.path, instance)
            if left is not None:
                replies += left[0]
                entries += left[1]
        return replies, entries

    def instance_id(self) -> str | None:
        return self._owner

    def standing(self) -> str | None:
        # The socket that proves this process alive lives as long as the process.
        return None if self._mailbox is not None else "this process has not joined the store"

    # copying whole tables (what makes this a CopyableStore)

    async def dump(self, table: str) -> AsyncIterator[list[dict[str, Any]]]:
        after: tuple[Any, ...] | None = None
        while rows := await self._read(copying.dump_batch, table, after):
            yield rows
            after = tuple(rows[-1][column] for column in copying.key_of(table))

    async def load(self, table: str, rows: list[dict[str, Any]]) -> None:
        await self._write(copying.load, table, rows)

    async def is_empty(self) -> bool:
        return await self._read(copying.is_empty)

    async def last_ids(self) -> dict[str, int]:
        return await self._read(copying.last_ids)

    async def after_load(self, last_ids: Mapping[str, int]) -> None:
        await self._write(copying.after_load, last_ids)

    async def totals(self) -> StoreTotals:
        return await self._read(copying.totals)

    # plumbing

    async def _read(self, call: Callable[..., _T], *args: Any) -> _T:
        """``call(connection, *args)`` on the store's thread; it must not write."""
        reader = self._reader
        if reader is None:
            raise StoreError(f"sqlite store {self.path} is not open")
        result: _T = await reader.run("read", call, *args)
        return result

    async def _write(self, call: Callable[..., _T], *args: Any) -> _T:
        """``call(connection, *args)`` on the store's thread, holding the write lock; atomic."""
        result: _T = await self._worker_or_fail().run("write", call, *args)
        return result

    def _worker_or_fail(self) -> SqliteWorker:
        if self._worker is None:
            raise StoreError(f"sqlite store {self.path} is not open")
        return self._worker


def _detach(worker: SqliteWorker) -> None:
    lock, worker.write_lock = worker.write_lock, None
    try:
        if worker.db is not None:
            # The last connection to close checkpoints and removes the WAL file, under an
            # exclusive lock that a process opening meanwhile would fail on: in turn too.
            with lock or contextlib.nullcontext():
                worker.db.close()
            worker.db = None
    finally:
        if lock is not None:
            lock.close()
