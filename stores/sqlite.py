"""The built-in SQLite store: one file shared by every worker process.

Each store instance owns one connection on a thread of its own
(:class:`~stores.sqlite_worker.SqliteWorker`); every store call is one plain
function run there, and calls that queue up together share one transaction
(group commit), each atomic in a savepoint of its own (a call alone is its
transaction's only call and needs none). (An async driver that
hopped to its thread per statement spent more time hopping than SQLite spent
working.) Groups that write start with ``BEGIN IMMEDIATE`` so that processes
sharing the file queue on SQLite's write lock (waiting up to
``busy_timeout_ms``) instead of deadlocking while upgrading a read lock. The
schema moves forward through :data:`MIGRATIONS`, tracked in ``PRAGMA
user_version``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from msgspec import UNSET

from core import (
    MAX_BALANCE,
    MICRO,
    ApiKey,
    BalanceTooLarge,
    Conversation,
    ConversationPatch,
    InsufficientBalance,
    LedgerDraft,
    LedgerEntry,
    LedgerSettlement,
    Message,
    MessageDraft,
    MessagePatch,
    NotFound,
    RateLimitExceeded,
    RateLimits,
    RateUse,
    Store,
    StoreError,
    UsageDay,
    User,
    hookimpl,
    utcnow,
)

from .sqlite_worker import SqliteWorker

MIGRATIONS: list[str] = [
    # 1: the initial schema. Times are INTEGER milliseconds since the epoch (UTC).
    """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        email TEXT NOT NULL UNIQUE,
        balance INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE api_keys (
        id INTEGER PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users (id),
        name TEXT NOT NULL,
        prefix TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER
    );
    CREATE INDEX api_keys_user ON api_keys (user_id);
    CREATE TABLE ledger (
        id INTEGER PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users (id),
        amount INTEGER NOT NULL,
        balance_after INTEGER NOT NULL,
        kind TEXT NOT NULL,
        key_id INTEGER,
        model TEXT,
        provider TEXT,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        latency_ms INTEGER,
        outcome TEXT,
        note TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX ledger_user ON ledger (user_id, id);
    -- AUTOINCREMENT: ids of deleted conversations and messages are never reused,
    -- so a client holding an old id cannot land on someone else's new row.
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id INTEGER NOT NULL REFERENCES users (id),
        kind TEXT NOT NULL,
        name TEXT NOT NULL DEFAULT '',
        favorite INTEGER NOT NULL DEFAULT 0,
        series_id INTEGER,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX conversations_user ON conversations (user_id, kind, series_id);
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        role TEXT NOT NULL,
        content TEXT NOT NULL DEFAULT '',
        reasoning TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL,
        model TEXT,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX messages_conversation ON messages (conversation_id, id);
    CREATE INDEX messages_generating ON messages (updated_at) WHERE status = 'generating';
    """,
    # 2: the rolling summary of messages that no longer fit the context budget.
    """
    ALTER TABLE conversations ADD COLUMN summary TEXT NOT NULL DEFAULT '';
    ALTER TABLE conversations ADD COLUMN summary_until INTEGER;
    """,
    # 3: a reply being generated names its reservation, settled by whoever finds it orphaned.
    """
    ALTER TABLE messages ADD COLUMN ledger_id INTEGER REFERENCES ledger (id);
    """,
    # 4: per-key rate limits (NULL: the configured default), counted from the ledger.
    """
    ALTER TABLE api_keys ADD COLUMN requests_per_minute INTEGER;
    ALTER TABLE api_keys ADD COLUMN tokens_per_minute INTEGER;
    ALTER TABLE api_keys ADD COLUMN concurrent_requests INTEGER;
    CREATE INDEX ledger_key ON ledger (key_id, created_at) WHERE key_id IS NOT NULL;
    """,
    # 5: the sliding minute of rate limits as per-second counts, so admitting a request
    # reads at most 60 rows instead of every request of the last minute.
    """
    CREATE TABLE rate_window (
        key_id INTEGER NOT NULL,
        second INTEGER NOT NULL,
        requests INTEGER NOT NULL,
        tokens INTEGER NOT NULL,
        PRIMARY KEY (key_id, second)
    ) WITHOUT ROWID;
    INSERT INTO rate_window (key_id, second, requests, tokens)
        SELECT key_id, created_at / 1000, count(*), sum(prompt_tokens + completion_tokens) FROM ledger
        WHERE key_id IS NOT NULL AND kind IN ('reservation', 'charge')
            AND created_at > CAST(strftime('%s', 'now') AS INTEGER) * 1000 - 60000
        GROUP BY key_id, created_at / 1000;
    CREATE INDEX ledger_in_flight ON ledger (key_id, created_at) WHERE kind = 'reservation';
    """,
    # 6: a conversation's revision moves with every write to its messages, whoever writes,
    # so readers can cache a long conversation and check it with one small read.
    """
    ALTER TABLE conversations ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
    CREATE TRIGGER messages_added AFTER INSERT ON messages BEGIN
        UPDATE conversations SET revision = revision + 1 WHERE id = NEW.conversation_id;
    END;
    CREATE TRIGGER messages_changed AFTER UPDATE ON messages BEGIN
        UPDATE conversations SET revision = revision + 1 WHERE id = NEW.conversation_id;
    END;
    CREATE TRIGGER messages_removed AFTER DELETE ON messages BEGIN
        UPDATE conversations SET revision = revision + 1 WHERE id = OLD.conversation_id;
    END;
    """,
    # 7: each message keeps the revision it last changed at, so a reader holding a
    # long conversation fetches only what changed since. messages_changed watches every
    # column but revision, so the stamp itself does not fire it again (a new column must
    # join that list: tests/stores/test_sqlite.py checks it).
    """
    ALTER TABLE messages ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX messages_revision ON messages (conversation_id, revision);
    DROP TRIGGER messages_added;
    DROP TRIGGER messages_changed;
    CREATE TRIGGER messages_added AFTER INSERT ON messages BEGIN
        UPDATE conversations SET revision = revision + 1 WHERE id = NEW.conversation_id;
        UPDATE messages SET revision = (SELECT revision FROM conversations WHERE id = NEW.conversation_id)
            WHERE id = NEW.id;
    END;
    CREATE TRIGGER messages_changed AFTER UPDATE OF conversation_id, role, content, reasoning, status, model,
            prompt_tokens, completion_tokens, error, created_at, updated_at, ledger_id ON messages BEGIN
        UPDATE conversations SET revision = revision + 1 WHERE id = NEW.conversation_id;
        UPDATE messages SET revision = (SELECT revision FROM conversations WHERE id = NEW.conversation_id)
            WHERE id = NEW.id;
    END;
    """,
    # A lease: one reservation for up to ``requests`` requests of a key, held by one process,
    # which admits them without a store call each and posts their charges in batches.
    """
    ALTER TABLE ledger ADD COLUMN requests INTEGER NOT NULL DEFAULT 1;
    DROP INDEX ledger_in_flight;
    CREATE INDEX ledger_in_flight ON ledger (key_id, created_at) WHERE kind IN ('reservation', 'lease');
    CREATE INDEX ledger_leases ON ledger (user_id) WHERE kind = 'lease';
    """,
    # 9: usage without a key (the email surface's) is limited per user, counted from these
    # entries over the last minute and day: an index, so that reads only those.
    """
    CREATE INDEX ledger_keyless ON ledger (user_id, created_at) WHERE key_id IS NULL;
    """,
]
"""Forward migrations; applying ``MIGRATIONS[n]`` takes the schema from version n to n + 1."""

LATEST_VERSION = len(MIGRATIONS)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_R = TypeVar("_R", bound=msgspec.Struct)


_T = TypeVar("_T")

COUNTED = ("reservation", "lease", "charge")
"""Ledger kinds that count against a key's rate limits."""

WINDOW_MS = 60_000  # the sliding minute of rate limits
IN_FLIGHT_MS = 15 * 60_000  # an older unsettled reservation belongs to a crashed process
DAY_MS = 24 * 3600_000  # the window of tokens_per_day


class SqliteOptions(msgspec.Struct, forbid_unknown_fields=True):
    """Options of the sqlite store.

    ``path`` is the database file, relative to the working directory; every
    worker must name the same file. ``busy_timeout_ms`` is how long a write
    waits for another process's write lock before failing.
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


class SqliteStore(Store):
    """Keeps everything in one SQLite file, safe to share between worker processes.

    Promises beyond :class:`~core.store.Store`: WAL journal, foreign keys on,
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
        worker.db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA busy_timeout = {int(self.options.busy_timeout_ms)}")
            # Before anything persistent (the journal mode is stored in the file),
            # so a database from a newer chatgate is left exactly as it was.
            _schema_version(db, str(self.path))
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
        settles it for all.
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
            workers = [w for w in (self._reader, self._worker) if w is not None]
            self._worker = self._reader = None
            for worker in workers:
                # Calls queued before this one run first: the thread takes them in order.
                await worker.run("alone", _detach)
                await worker.stop()

    async def ping(self) -> None:
        await self._read(_rows, "SELECT 1")

    # users

    async def ensure_user(self, email: str) -> User:
        email = _normal_email(email)
        if not email:
            raise ValueError("email must not be empty")
        return await self._write(_ensure_user, email)

    async def get_user(self, user_id: int) -> User:
        return await self._read(_user, user_id)

    async def find_user(self, email: str) -> User | None:
        return await self._read(_first, User, f"{_USERS} WHERE email = ?", (_normal_email(email),))

    async def list_users(self) -> list[User]:
        return await self._read(_all, User, f"{_USERS} ORDER BY id")

    # API keys

    async def create_api_key(self, user_id: int, name: str, prefix: str, key_hash: str) -> ApiKey:
        values = {"user_id": user_id, "name": name, "prefix": prefix, "key_hash": key_hash}
        return await self._write(_create_api_key, values)

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        return await self._read(_key_by_hash, key_hash)

    async def find_api_key_owner(self, key_hash: str) -> tuple[ApiKey, User] | None:
        return await self._read(_key_and_owner, key_hash)

    async def list_api_keys(self, user_id: int | None = None) -> list[ApiKey]:
        if user_id is None:
            return await self._read(_all, ApiKey, "SELECT * FROM api_keys ORDER BY id")
        return await self._read(
            _all, ApiKey, "SELECT * FROM api_keys WHERE user_id = ? ORDER BY id", (user_id,)
        )

    async def revoke_api_key(self, key_id: int) -> ApiKey:
        # COALESCE keeps the first revocation time: revoking again changes nothing.
        sql = "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ? RETURNING *"
        return await self._write(_write_one, ApiKey, sql, (_now(), key_id), "api key", key_id)

    async def set_api_key_limits(self, key_id: int, limits: RateLimits) -> ApiKey:
        sql = (
            "UPDATE api_keys SET requests_per_minute = ?, tokens_per_minute = ?, concurrent_requests = ? "
            "WHERE id = ? RETURNING *"
        )
        params = (limits.requests_per_minute, limits.tokens_per_minute, limits.concurrent_requests, key_id)
        return await self._write(_write_one, ApiKey, sql, params, "api key", key_id)

    # ledger

    async def admit(
        self, draft: LedgerDraft, limits: RateLimits, *, floor: int = 0, tokens_per_day: int | None = None
    ) -> tuple[LedgerEntry, RateUse]:
        if draft.key_id is None:
            return await self._write(_admit_keyless, draft, limits, floor, tokens_per_day)
        if tokens_per_day is not None:
            raise ValueError("tokens_per_day applies to usage without a key only")
        return await self._write(_admit, draft, limits, floor)

    async def post_ledger(self, draft: LedgerDraft, *, floor: int | None = 0) -> LedgerEntry:
        return await self._write(_post_ledger, draft, floor)

    async def settle_ledger(self, entry_id: int, settlement: LedgerSettlement) -> LedgerEntry:
        return await self._write(_settle_ledger, entry_id, settlement)

    async def charge_lease(self, lease_id: int, charges: list[LedgerDraft], counted_tokens: int) -> int:
        return await self._write(_charge_lease, lease_id, charges, counted_tokens)

    async def release_lease(self, lease_id: int, unused_requests: int, unused_tokens: int) -> LedgerEntry:
        return await self._write(_release_lease, lease_id, unused_requests, unused_tokens)

    async def shrink_lease(
        self, lease_id: int, requests: int, unused_requests: int, unused_tokens: int, unused_amount: int
    ) -> None:
        await self._write(_shrink_lease, lease_id, requests, unused_requests, unused_tokens, unused_amount)

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
        params: list[Any] = [_ms(since)]
        if user_id is not None:
            sql += " AND user_id = ?"
            params.append(user_id)
        if key_id is not None:
            sql += " AND key_id = ?"
            params.append(key_id)
        sql += " GROUP BY day, user_id, key_id ORDER BY day, user_id, key_id"
        rows = await self._read(_rows, sql, params)
        return [
            UsageDay(day, user, key, requests, prompt, completion, credits * MICRO + micro)
            for day, user, key, requests, prompt, completion, credits, micro in rows
        ]

    async def stale_reservations(self, created_before: datetime) -> list[LedgerEntry]:
        sql = (
            "SELECT * FROM ledger WHERE kind IN ('reservation', 'lease') AND created_at < ?"
            " AND NOT EXISTS (SELECT 1 FROM messages WHERE messages.ledger_id = ledger.id) ORDER BY id"
        )
        return await self._read(_all, LedgerEntry, sql, (_ms(created_before),))

    async def get_ledger_entry(self, entry_id: int) -> LedgerEntry:
        return await self._read(_get, LedgerEntry, "ledger", entry_id, "ledger entry")

    async def list_ledger(self, user_id: int, limit: int = 100) -> list[LedgerEntry]:
        sql = "SELECT * FROM ledger WHERE user_id = ? ORDER BY id DESC LIMIT ?"
        return await self._read(_all, LedgerEntry, sql, (user_id, limit))

    # conversations

    async def create_conversation(
        self, user_id: int, kind: str, name: str = "", series_id: int | None = None
    ) -> Conversation:
        values = {"user_id": user_id, "kind": kind, "name": name, "series_id": series_id}
        return await self._write(_create_conversation, values)

    async def get_conversation(self, conversation_id: int) -> Conversation:
        return await self._read(_get, Conversation, "conversations", conversation_id, "conversation")

    async def conversation_since(
        self, conversation_id: int, after_revision: int
    ) -> tuple[Conversation, list[Message]]:
        return await self._read(_conversation_since, conversation_id, after_revision)

    async def list_conversations(
        self, user_id: int, kind: str | None = None, series_id: int | None = None
    ) -> list[Conversation]:
        filters: dict[str, Any] = {"user_id": user_id, "kind": kind, "series_id": series_id}
        filters = {column: value for column, value in filters.items() if value is not None}
        where = " AND ".join(f"{column} = ?" for column in filters)
        sql = f"SELECT * FROM conversations WHERE {where} ORDER BY id"
        return await self._read(_all, Conversation, sql, list(filters.values()))

    async def update_conversation(self, conversation_id: int, patch: ConversationPatch) -> Conversation:
        values = {**_set(patch), "updated_at": _now()}
        return await self._write(
            _update_one, Conversation, "conversations", conversation_id, values, "conversation"
        )

    async def delete_conversation(self, conversation_id: int) -> Conversation:
        # Messages go with it through ON DELETE CASCADE.
        sql = "DELETE FROM conversations WHERE id = ? RETURNING *"
        return await self._write(
            _write_one, Conversation, sql, (conversation_id,), "conversation", conversation_id
        )

    # messages

    async def append_message(self, conversation_id: int, draft: MessageDraft) -> Message:
        return await self._write(_append_message, conversation_id, draft)

    async def append_messages(self, conversation_id: int, drafts: list[MessageDraft]) -> list[Message]:
        return await self._write(_append_messages, conversation_id, drafts)

    async def update_message(self, message_id: int, patch: MessagePatch) -> Message:
        values = {**_set(patch), "updated_at": _now()}
        return await self._write(_update_message, message_id, values)

    async def get_message(self, message_id: int) -> Message:
        return await self._read(_get, Message, "messages", message_id, "message")

    async def list_messages(self, conversation_id: int) -> list[Message]:
        return await self._read(_messages, conversation_id, -1)

    async def changed_messages(self, conversation_id: int, after_revision: int) -> list[Message]:
        return await self._read(_messages, conversation_id, after_revision)

    async def interrupt_stale_generations(self, updated_before: datetime) -> list[Message]:
        # Stamps are whole milliseconds, so stamp < cutoff exactly when
        # stamp < the cutoff rounded up to a whole millisecond.
        cutoff = -((_EPOCH - updated_before) // _MS)
        messages = await self._write(_interrupt_stale, cutoff)
        return sorted(messages, key=lambda m: m.id)

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


@hookimpl
def register_stores() -> list[type[Store]]:
    return [SqliteStore]


# --- what runs on the store's thread: each function is one whole call, made atomic by the worker ---


def _detach(worker: SqliteWorker) -> None:
    if worker.db is not None:
        worker.db.close()
        worker.db = None


def _ensure_user(db: sqlite3.Connection, email: str) -> User:
    if found := _first(db, User, f"{_USERS} WHERE email = ?", (email,)):
        return found
    db.execute(
        "INSERT INTO users (email, balance, created_at) VALUES (?, 0, ?) ON CONFLICT (email) DO NOTHING",
        (email, _now()),
    )
    [row] = _rows(db, f"{_USERS} WHERE email = ?", (email,))
    return _record(User, row)


def _key_by_hash(db: sqlite3.Connection, key_hash: str) -> ApiKey | None:
    return _first(db, ApiKey, "SELECT * FROM api_keys WHERE key_hash = ?", (key_hash,))


def _key_and_owner(db: sqlite3.Connection, key_hash: str) -> tuple[ApiKey, User] | None:
    key = _key_by_hash(db, key_hash)
    return None if key is None else (key, _user(db, key.user_id))


def _create_api_key(db: sqlite3.Connection, values: dict[str, Any]) -> ApiKey:
    _balance(db, values["user_id"])
    if _rows(db, "SELECT 1 FROM api_keys WHERE key_hash = ?", (values["key_hash"],)):
        raise StoreError(f"an api key with this hash already exists (prefix {values['prefix']!r})")
    return _record(ApiKey, _insert(db, "api_keys", {**values, "created_at": _now()}))


def _admit(
    db: sqlite3.Connection, draft: LedgerDraft, limits: RateLimits, floor: int
) -> tuple[LedgerEntry, RateUse]:
    now = _now()
    # Whole seconds that lie entirely within the last minute. One statement reads the
    # window, whether older seconds are left to prune, and the reservations in flight.
    first_second = (now - WINDOW_MS) // 1000 + 1
    [(requests, tokens, oldest, stale, concurrent)] = db.execute(
        "SELECT coalesce(sum(requests) FILTER (WHERE second >= ?1), 0),"
        " coalesce(sum(tokens) FILTER (WHERE second >= ?1), 0),"
        " min(second) FILTER (WHERE second >= ?1), coalesce(min(second) < ?1, 0),"
        " (SELECT coalesce(sum(requests), 0) FROM ledger"
        "  WHERE key_id = ?2 AND kind IN ('reservation', 'lease') AND created_at > ?3)"
        " FROM rate_window WHERE key_id = ?2",
        (first_second, draft.key_id, now - IN_FLIGHT_MS),
    ).fetchall()
    if stale:  # about once a second per busy key, not once a request
        db.execute("DELETE FROM rate_window WHERE key_id = ? AND second < ?", (draft.key_id, first_second))
    requests += draft.requests
    tokens += draft.prompt_tokens + draft.completion_tokens
    concurrent += draft.requests
    # The window frees up when its oldest second (this one, when it is empty) leaves it.
    oldest = now // 1000 if oldest is None else oldest
    reset = max(0.0, (oldest * 1000 + WINDOW_MS - now) / 1000)
    use = RateUse(requests, tokens, concurrent, reset, reset)
    _refuse_past(limits, use)
    return _post(db, draft, floor, now), use


def _refuse_past(limits: RateLimits, use: RateUse) -> None:
    """Raise :class:`RateLimitExceeded` for the first of ``limits`` that ``use`` (counting the
    request being admitted) passes."""
    for limit, used, retry in (
        ("requests_per_minute", use.requests, use.requests_reset),
        ("tokens_per_minute", use.tokens, use.tokens_reset),
        ("concurrent_requests", use.concurrent, 1.0),
    ):
        allowed = getattr(limits, limit)
        if allowed is not None and used > allowed:
            raise RateLimitExceeded(limit, allowed, retry, use)


def _admit_keyless(
    db: sqlite3.Connection, draft: LedgerDraft, limits: RateLimits, floor: int, tokens_per_day: int | None
) -> tuple[LedgerEntry, RateUse]:
    # Usage without a key is counted from the user's keyless entries themselves (index
    # ledger_keyless): no rate_window rows, and the day's tokens need the entries anyway.
    now = _now()
    since = now - max(IN_FLIGHT_MS, WINDOW_MS, DAY_MS if tokens_per_day is not None else 0)
    [(requests, tokens, oldest, concurrent, day)] = db.execute(
        "SELECT coalesce(sum(requests) FILTER (WHERE created_at > ?2), 0),"
        " coalesce(sum(prompt_tokens + completion_tokens) FILTER (WHERE created_at > ?2), 0),"
        " min(created_at) FILTER (WHERE created_at > ?2),"
        " coalesce(sum(requests) FILTER (WHERE kind IN ('reservation', 'lease') AND created_at > ?3), 0),"
        " coalesce(sum(prompt_tokens + completion_tokens) FILTER (WHERE created_at > ?4), 0)"
        " FROM ledger WHERE user_id = ?1 AND key_id IS NULL AND kind IN ('reservation', 'lease', 'charge')"
        " AND created_at > ?5",
        (draft.user_id, now - WINDOW_MS, now - IN_FLIGHT_MS, now - DAY_MS, since),
    ).fetchall()
    requests += draft.requests
    tokens += draft.prompt_tokens + draft.completion_tokens
    concurrent += draft.requests
    reset = max(0.0, ((now if oldest is None else oldest) + WINDOW_MS - now) / 1000)
    use = RateUse(requests, tokens, concurrent, reset, reset)
    _refuse_past(limits, use)
    if tokens_per_day is not None and day >= tokens_per_day:
        retry = _day_frees(db, draft, now, tokens_per_day)
        raise RateLimitExceeded("tokens_per_day", tokens_per_day, retry, use)
    return _post(db, draft, floor, now), use


def _day_frees(db: sqlite3.Connection, draft: LedgerDraft, now: int, tokens_per_day: int) -> float:
    """Seconds until enough of a user's keyless tokens of the last day are older than a day."""
    rows = db.execute(
        "SELECT created_at, prompt_tokens + completion_tokens FROM ledger"
        " WHERE user_id = ? AND key_id IS NULL AND kind IN ('reservation', 'lease', 'charge')"
        " AND created_at > ? ORDER BY created_at",
        (draft.user_id, now - DAY_MS),
    ).fetchall()
    left = sum(tokens for _, tokens in rows)
    for created_at, tokens in rows:
        left -= tokens
        if left < tokens_per_day:
            return max(0.001, (int(created_at) + DAY_MS - now) / 1000)
    return DAY_MS / 1000


def _post_ledger(db: sqlite3.Connection, draft: LedgerDraft, floor: int | None) -> LedgerEntry:
    return _post(db, draft, floor, _now())


def _post(db: sqlite3.Connection, draft: LedgerDraft, floor: int | None, now: int) -> LedgerEntry:
    # The floor and ceiling checks and the move in one statement (a charge is held to the floor
    # unless it is None, a credit to the ceiling); only a refusal reads the balance again, for
    # its message (NotFound for a missing user).
    if abs(draft.amount) > MAX_BALANCE:  # nor would SQLite bind every such integer
        moved = []
    else:
        moved = db.execute(
            "UPDATE users SET balance = balance + ?1 WHERE id = ?2"
            " AND (?3 IS NULL OR ?1 >= 0 OR balance + ?1 >= ?3) AND (?1 <= 0 OR balance + ?1 <= ?4)"
            " RETURNING balance",
            (draft.amount, draft.user_id, floor, MAX_BALANCE),
        ).fetchall()
    if not moved:
        balance = _balance(db, draft.user_id)
        if draft.amount > 0:
            raise BalanceTooLarge(balance, draft.amount)
        raise InsufficientBalance(balance, draft.amount)
    after = moved[0][0]
    values = (*msgspec.structs.astuple(draft), after, now, now)
    [(entry_id,)] = db.execute(_INSERT_LEDGER, values).fetchall()
    if draft.key_id is not None and draft.kind in COUNTED:
        _count(db, draft.key_id, now, draft.requests, draft.prompt_tokens + draft.completion_tokens)
    stamp = _EPOCH + now * _MS
    d = draft  # the entry is what was inserted: no need to read it back
    return LedgerEntry(
        entry_id, d.user_id, d.amount, after, d.kind, d.key_id, d.model, d.provider, d.prompt_tokens,
        d.completion_tokens, d.latency_ms, d.outcome, d.note, stamp, stamp, d.requests,
    )  # fmt: skip


_INSERT_LEDGER = (
    f"INSERT INTO ledger ({', '.join(LedgerDraft.__struct_fields__)}, balance_after, created_at, updated_at)"
    f" VALUES ({', '.join('?' * (len(LedgerDraft.__struct_fields__) + 3))}) RETURNING id"
)
_LEDGER_COLUMNS = ", ".join(LedgerEntry.__struct_fields__)
_SETTLE_LEDGER = (
    f"UPDATE ledger SET {', '.join(f'{field} = ?' for field in LedgerSettlement.__struct_fields__)},"
    f" balance_after = ?, updated_at = ? WHERE id = ? RETURNING {_LEDGER_COLUMNS}"
)


_INSERT_CHARGE = _INSERT_LEDGER.removesuffix(" RETURNING id")


def _open_lease(db: sqlite3.Connection, lease_id: int) -> tuple[int, int, int | None, int] | None:
    """A lease's amount still held, user, key and creation time; None once released."""
    rows = db.execute(
        "SELECT amount, user_id, key_id, created_at, kind FROM ledger WHERE id = ?", (lease_id,)
    ).fetchall()
    held, user_id, key_id, created_at, kind = _found(rows, "ledger entry", lease_id)
    if kind == "released":
        return None
    if kind != "lease":
        raise StoreError(f"ledger entry {lease_id} is a {kind}, not a lease")
    return held, user_id, key_id, created_at


def _charge_lease(
    db: sqlite3.Connection, lease_id: int, charges: list[LedgerDraft], counted_tokens: int
) -> int:
    lease = _open_lease(db, lease_id)
    if lease is None:
        raise StoreError(f"lease {lease_id} was released: its charges must be posted before")
    held, user_id, key_id, created_at = lease
    now = _now()
    left = held - sum(charge.amount for charge in charges)  # held and charges are negative
    # Usage beyond the worst case (a prompt longer than estimated) was spent all the same:
    # what the lease cannot cover comes from the balance, with no floor.
    [(balance,)] = db.execute(
        "UPDATE users SET balance = balance - ? WHERE id = ? RETURNING balance", (max(0, left), user_id)
    ).fetchall()
    db.execute("UPDATE ledger SET amount = ?, updated_at = ? WHERE id = ?", (min(0, left), now, lease_id))
    db.executemany(_INSERT_CHARGE, [(*msgspec.structs.astuple(c), balance, now, now) for c in charges])
    if key_id is not None:
        # The lease counted its requests when it was posted; their tokens are now known.
        used = sum(charge.prompt_tokens + charge.completion_tokens for charge in charges)
        _count(db, key_id, created_at, 0, used - counted_tokens)
    return int(balance)


def _shrink_lease(
    db: sqlite3.Connection,
    lease_id: int,
    requests: int,
    unused_requests: int,
    unused_tokens: int,
    unused_amount: int,
) -> None:
    lease = _open_lease(db, lease_id)
    if lease is None:
        return
    held, user_id, key_id, created_at = lease
    back = min(unused_amount, -held)  # never more than it still holds
    db.execute("UPDATE users SET balance = balance + ? WHERE id = ?", (back, user_id))
    db.execute(
        "UPDATE ledger SET amount = amount + ?, requests = ?, updated_at = ? WHERE id = ?",
        (back, requests, _now(), lease_id),
    )
    if key_id is not None:
        _count(db, key_id, created_at, -unused_requests, -unused_tokens)


def _release_lease(
    db: sqlite3.Connection, lease_id: int, unused_requests: int, unused_tokens: int
) -> LedgerEntry:
    lease = _open_lease(db, lease_id)
    if lease is None:
        return _get(db, LedgerEntry, "ledger", lease_id, "ledger entry")
    held, user_id, key_id, created_at = lease
    [(after,)] = db.execute(
        "UPDATE users SET balance = balance - ? WHERE id = ? RETURNING balance", (held, user_id)
    ).fetchall()
    [row] = db.execute(
        "UPDATE ledger SET kind = 'released', outcome = 'released', amount = 0, balance_after = ?,"
        " updated_at = ? WHERE id = ?"
        f" RETURNING {_LEDGER_COLUMNS}",
        (after, _now(), lease_id),
    ).fetchall()
    if key_id is not None:
        _count(db, key_id, created_at, -unused_requests, -unused_tokens)
    return _ledger_entry(row)


def _ledger_entry(row: Sequence[Any]) -> LedgerEntry:
    # Columns in field order (_LEDGER_COLUMNS): the two stamps, then requests, come last.
    return LedgerEntry(*row[:13], _EPOCH + row[13] * _MS, _EPOCH + row[14] * _MS, row[15])  # type: ignore[call-arg]


def _settle_ledger(db: sqlite3.Connection, entry_id: int, settlement: LedgerSettlement) -> LedgerEntry:
    old = _found(
        db.execute(
            "SELECT amount, user_id, key_id, kind, prompt_tokens, completion_tokens, created_at"
            " FROM ledger WHERE id = ?",
            (entry_id,),
        ).fetchall(),
        "ledger entry",
        entry_id,
    )
    amount, user_id, key_id, kind, prompt_tokens, completion_tokens, created_at = old
    [(after,)] = db.execute(
        "UPDATE users SET balance = balance + ? WHERE id = ? RETURNING balance",
        (settlement.amount - amount, user_id),
    ).fetchall()
    values = (*msgspec.structs.astuple(settlement), after, _now(), entry_id)
    [row] = db.execute(_SETTLE_LEDGER, values).fetchall()
    if key_id is not None:
        # The minute the entry was counted in now counts what it really used.
        was = kind in COUNTED
        now = settlement.kind in COUNTED
        tokens = (settlement.prompt_tokens + settlement.completion_tokens) * now
        tokens -= (prompt_tokens + completion_tokens) * was
        _count(db, key_id, created_at, now - was, tokens)
    return _ledger_entry(row)


def _count(db: sqlite3.Connection, key_id: int, at_ms: int, requests: int, tokens: int) -> None:
    if requests or tokens:
        db.execute(
            "INSERT INTO rate_window (key_id, second, requests, tokens) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (key_id, second) DO UPDATE"
            " SET requests = requests + excluded.requests, tokens = tokens + excluded.tokens",
            (key_id, at_ms // 1000, requests, tokens),
        )


def _create_conversation(db: sqlite3.Connection, values: dict[str, Any]) -> Conversation:
    now = _now()
    _balance(db, values["user_id"])
    return _record(
        Conversation, _insert(db, "conversations", {**values, "created_at": now, "updated_at": now})
    )


def _append_message(db: sqlite3.Connection, conversation_id: int, draft: MessageDraft) -> Message:
    now = _now()  # under the write lock, so timestamps follow ids across processes too
    bumped = _rows(
        db, "UPDATE conversations SET updated_at = ? WHERE id = ? RETURNING id", (now, conversation_id)
    )
    _found(bumped, "conversation", conversation_id)
    values = {**msgspec.structs.asdict(draft), "conversation_id": conversation_id}
    row = _insert(db, "messages", {**values, "created_at": now, "updated_at": now})
    return _message(db, row["id"])


def _append_messages(
    db: sqlite3.Connection, conversation_id: int, drafts: list[MessageDraft]
) -> list[Message]:
    return [_append_message(db, conversation_id, draft) for draft in drafts]  # one transaction: all or none


def _message(db: sqlite3.Connection, message_id: int) -> Message:
    # Read back after the write: RETURNING shows the row before the triggers stamped its revision.
    return _get(db, Message, "messages", message_id, "message")


def _update_message(db: sqlite3.Connection, message_id: int, values: dict[str, Any]) -> Message:
    _found(_update(db, "messages", message_id, values), "message", message_id)
    return _message(db, message_id)


def _interrupt_stale(db: sqlite3.Connection, cutoff_ms: int) -> list[Message]:
    sql = (
        "UPDATE messages SET status = 'interrupted', updated_at = ?"
        " WHERE status = 'generating' AND updated_at < ? RETURNING *"
    )
    return [_message(db, row["id"]) for row in _rows(db, sql, (_now(), cutoff_ms))]


def _get(db: sqlite3.Connection, cls: type[_R], table: str, row_id: int, kind: str) -> _R:
    # Table names come from this module, never from callers' data.
    return _record(cls, _found(_rows(db, f"SELECT * FROM {table} WHERE id = ?", (row_id,)), kind, row_id))


def _conversation_since(
    db: sqlite3.Connection, conversation_id: int, after_revision: int
) -> tuple[Conversation, list[Message]]:
    # One read call is one transaction: the messages are those of the revision returned.
    conversation = _get(db, Conversation, "conversations", conversation_id, "conversation")
    if conversation.revision <= after_revision:
        return conversation, []
    return conversation, _messages(db, conversation_id, after_revision)


_USERS = (
    "SELECT id, email, balance - coalesce((SELECT sum(amount) FROM ledger"
    " WHERE ledger.user_id = users.id AND kind = 'lease'), 0) AS balance, created_at FROM users"
)
"""Users as :class:`~core.store.User`: what open leases hold and did not spend is theirs."""


def _user(db: sqlite3.Connection, user_id: int) -> User:
    return _record(User, _found(_rows(db, f"{_USERS} WHERE id = ?", (user_id,)), "user", user_id))


def _first(db: sqlite3.Connection, cls: type[_R], sql: str, params: Sequence[Any] = ()) -> _R | None:
    rows = _rows(db, sql, params)
    return _record(cls, rows[0]) if rows else None


def _all(db: sqlite3.Connection, cls: type[_R], sql: str, params: Sequence[Any] = ()) -> list[_R]:
    return [_record(cls, row) for row in _rows(db, sql, params)]


_MESSAGE_COLUMNS = (
    "id, conversation_id, role, content, reasoning, status, model, prompt_tokens, completion_tokens,"
    " error, created_at, updated_at, ledger_id, revision"
)


def _messages(db: sqlite3.Connection, conversation_id: int, after_revision: int) -> list[Message]:
    # The hot read of long conversations (a polled record): tuples and positional
    # structs, about 1.4x faster than rows by name through _record.
    cursor = db.cursor()
    cursor.row_factory = None
    cursor.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? AND revision > ? ORDER BY id",
        (conversation_id, after_revision),
    )
    epoch, ms = _EPOCH, _MS
    # Columns in field order; the two stamps (then ledger_id and revision) come last.
    return [
        Message(*row[:10], epoch + row[10] * ms, epoch + row[11] * ms, row[12], row[13])  # type: ignore[call-arg]
        for row in cursor.fetchall()
    ]


def _write_one(
    db: sqlite3.Connection, cls: type[_R], sql: str, params: Sequence[Any], kind: str, row_id: int
) -> _R:
    return _record(cls, _found(_rows(db, sql, params), kind, row_id))


def _update_one(
    db: sqlite3.Connection, cls: type[_R], table: str, row_id: int, values: dict[str, Any], kind: str
) -> _R:
    return _record(cls, _found(_update(db, table, row_id, values), kind, row_id))


def migrate(conn: sqlite3.Connection, target: int | None = None) -> int:
    """Apply forward migrations until the schema is at ``target`` (default: the latest).

    ``conn`` is in autocommit mode (``isolation_level=None``). Each migration
    runs in its own ``BEGIN IMMEDIATE`` transaction that re-reads the version
    first, so workers opening a fresh file at once apply each migration
    exactly once. Returns the version reached; raises
    :class:`~core.errors.StoreError` for a database newer than this code.
    """
    target = LATEST_VERSION if target is None else target
    if not 0 <= target <= LATEST_VERSION:
        raise ValueError(f"no schema version {target}; this chatgate knows 0..{LATEST_VERSION}")
    while True:
        with _transaction(conn):
            version = _schema_version(conn)
            if version >= target:
                return version
            for statement in _statements(MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")


def _schema_version(conn: sqlite3.Connection, database: str = "the database") -> int:
    [(version,)] = conn.execute("PRAGMA user_version").fetchall()
    if version > LATEST_VERSION:
        raise StoreError(
            f"{database} is at schema version {version}, but this chatgate supports"
            f" up to version {LATEST_VERSION}; upgrade chatgate to open it"
        )
    return int(version)


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.rollback()
        raise
    conn.commit()


def _rows(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
    return conn.execute(sql, params).fetchall()


def _balance(db: sqlite3.Connection, user_id: int) -> int:
    rows = _rows(db, "SELECT balance FROM users WHERE id = ?", (user_id,))
    return int(_found(rows, "user", user_id)["balance"])


def _insert(db: sqlite3.Connection, table: str, values: dict[str, Any]) -> sqlite3.Row:
    # Column names come from struct fields, never from callers' data.
    columns = ", ".join(values)
    marks = ", ".join("?" * len(values))
    [row] = _rows(db, f"INSERT INTO {table} ({columns}) VALUES ({marks}) RETURNING *", list(values.values()))
    return row


def _update(db: sqlite3.Connection, table: str, row_id: int, values: dict[str, Any]) -> list[sqlite3.Row]:
    assignments = ", ".join(f"{column} = ?" for column in values)
    return _rows(db, f"UPDATE {table} SET {assignments} WHERE id = ? RETURNING *", [*values.values(), row_id])


def _set(patch: msgspec.Struct) -> dict[str, Any]:
    return {key: value for key, value in msgspec.structs.asdict(patch).items() if value is not UNSET}


def _found(rows: list[sqlite3.Row], kind: str, row_id: int) -> sqlite3.Row:
    if not rows:
        raise NotFound(f"{kind} {row_id} not found")
    return rows[0]


def _record(cls: type[_R], row: sqlite3.Row) -> _R:
    # Columns carry the struct's field names; *_at columns are ms timestamps.
    if cls is ApiKey:
        limits = RateLimits(row["requests_per_minute"], row["tokens_per_minute"], row["concurrent_requests"])
        return cls(**{**_values(ApiKey, row, ("limits",)), "limits": limits})
    return cls(**_values(cls, row))


def _values(cls: type[msgspec.Struct], row: sqlite3.Row, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    values = {field: row[field] for field in cls.__struct_fields__ if field not in skip}
    for field in values:
        if field.endswith("_at") and values[field] is not None:
            values[field] = _EPOCH + values[field] * _MS
    if "favorite" in values:
        values["favorite"] = bool(values["favorite"])
    return values


def _statements(script: str) -> Iterator[str]:
    # Split on ';' but only where SQLite agrees a statement ends (not inside
    # a string, comment or trigger body).
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\n;"):
                yield pending
            pending = ""


def _normal_email(email: str) -> str:
    return email.strip().lower()


def _now() -> int:
    return _ms(utcnow())


def _ms(moment: datetime) -> int:
    return (moment - _EPOCH) // _MS
