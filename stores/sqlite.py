"""The built-in SQLite store: one file shared by every worker process.

Each store instance owns one aiosqlite connection. Write transactions start
with ``BEGIN IMMEDIATE`` so that processes sharing the file queue on SQLite's
write lock (waiting up to ``busy_timeout_ms``) instead of deadlocking while
upgrading a read lock. The schema moves forward through :data:`MIGRATIONS`,
tracked in ``PRAGMA user_version``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import msgspec
from msgspec import UNSET

from core.errors import InsufficientBalance, NotFound, RateLimitExceeded, StoreError
from core.hookspecs import hookimpl
from core.store import (
    ApiKey,
    Conversation,
    ConversationPatch,
    LedgerDraft,
    LedgerEntry,
    LedgerSettlement,
    Message,
    MessageDraft,
    MessagePatch,
    RateLimits,
    RateUse,
    Store,
    UsageDay,
    User,
    utcnow,
)

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
]
"""Forward migrations; applying ``MIGRATIONS[n]`` takes the schema from version n to n + 1."""

LATEST_VERSION = len(MIGRATIONS)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_R = TypeVar("_R", bound=msgspec.Struct)


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
    the settlement (not a rewrite of history), and a database written by a
    newer chatgate is refused rather than touched.
    """

    name = "sqlite"
    Options = SqliteOptions

    def __init__(self, options: SqliteOptions) -> None:
        super().__init__(options)
        self.path = Path(options.path).absolute()
        self._db: aiosqlite.Connection | None = None
        # One connection runs one transaction at a time; reads take the lock
        # too so they never see another task's uncommitted writes.
        self._lock = asyncio.Lock()

    # lifecycle

    async def open(self) -> None:
        async with self._lock:  # two concurrent opens must not leak a connection
            if self._db is None:
                try:
                    self._db = await self._connect()
                except (OSError, sqlite3.Error) as exc:
                    raise StoreError(
                        f"cannot open the SQLite database {self.path}: {exc}; "
                        "check [store] path and its permissions"
                    ) from exc

    async def _connect(self) -> aiosqlite.Connection:
        await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            await db.execute_fetchall(f"PRAGMA busy_timeout = {int(self.options.busy_timeout_ms)}")
            # Before anything persistent (the journal mode is stored in the file),
            # so a database from a newer chatgate is left exactly as it was.
            await _schema_version(db, str(self.path))
            mode = await self._enable_wal(db)
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: SQLite refused WAL journal mode (got {mode!r})")
            await db.execute_fetchall("PRAGMA synchronous = NORMAL")
            await db.execute_fetchall("PRAGMA foreign_keys = ON")
            await migrate(db)
        except BaseException:
            await db.close()  # its thread would otherwise keep the process alive
            raise
        return db

    async def _enable_wal(self, db: aiosqlite.Connection) -> str:
        """Switch the file to WAL, retrying while another worker holds it.

        The switch needs an exclusive lock and SQLite may refuse it at once
        instead of waiting out ``busy_timeout`` (workers opening a fresh file
        together); the mode is stored in the file, so the first to succeed
        settles it for all.
        """
        deadline = asyncio.get_running_loop().time() + self.options.busy_timeout_ms / 1000
        while True:
            try:
                [(mode,)] = await db.execute_fetchall("PRAGMA journal_mode = WAL")
                return str(mode)
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or asyncio.get_running_loop().time() >= deadline:
                    raise
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            async with self._lock:
                await db.close()

    async def ping(self) -> None:
        await self._fetch("SELECT 1")

    # users

    async def ensure_user(self, email: str) -> User:
        email = _normal_email(email)
        if not email:
            raise ValueError("email must not be empty")
        if user := await self.find_user(email):
            return user
        async with self._write() as db:
            await _rows(
                db,
                "INSERT INTO users (email, balance, created_at) VALUES (?, 0, ?)"
                " ON CONFLICT (email) DO NOTHING",
                (email, _now()),
            )
            [row] = await _rows(db, "SELECT * FROM users WHERE email = ?", (email,))
        return _record(User, row)

    async def get_user(self, user_id: int) -> User:
        rows = await self._fetch("SELECT * FROM users WHERE id = ?", (user_id,))
        return _record(User, _found(rows, "user", user_id))

    async def find_user(self, email: str) -> User | None:
        rows = await self._fetch("SELECT * FROM users WHERE email = ?", (_normal_email(email),))
        return _record(User, rows[0]) if rows else None

    async def list_users(self) -> list[User]:
        return [_record(User, row) for row in await self._fetch("SELECT * FROM users ORDER BY id")]

    # API keys

    async def create_api_key(self, user_id: int, name: str, prefix: str, key_hash: str) -> ApiKey:
        values = {"user_id": user_id, "name": name, "prefix": prefix, "key_hash": key_hash}
        async with self._write() as db:
            await _balance(db, user_id)
            if await _rows(db, "SELECT 1 FROM api_keys WHERE key_hash = ?", (key_hash,)):
                raise StoreError(f"an api key with this hash already exists (prefix {prefix!r})")
            row = await _insert(db, "api_keys", {**values, "created_at": _now()})
        return _record(ApiKey, row)

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        rows = await self._fetch("SELECT * FROM api_keys WHERE key_hash = ?", (key_hash,))
        return _record(ApiKey, rows[0]) if rows else None

    async def list_api_keys(self, user_id: int | None = None) -> list[ApiKey]:
        if user_id is None:
            rows = await self._fetch("SELECT * FROM api_keys ORDER BY id")
        else:
            rows = await self._fetch("SELECT * FROM api_keys WHERE user_id = ? ORDER BY id", (user_id,))
        return [_record(ApiKey, row) for row in rows]

    async def revoke_api_key(self, key_id: int) -> ApiKey:
        async with self._write() as db:
            rows = await _rows(
                db,
                # COALESCE keeps the first revocation time: revoking again changes nothing.
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ? RETURNING *",
                (_now(), key_id),
            )
        return _record(ApiKey, _found(rows, "api key", key_id))

    async def set_api_key_limits(self, key_id: int, limits: RateLimits) -> ApiKey:
        async with self._write() as db:
            rows = await _rows(
                db,
                "UPDATE api_keys SET requests_per_minute = ?, tokens_per_minute = ?, concurrent_requests = ? "
                "WHERE id = ? RETURNING *",
                (limits.requests_per_minute, limits.tokens_per_minute, limits.concurrent_requests, key_id),
            )
        return _record(ApiKey, _found(rows, "api key", key_id))

    # ledger

    async def admit(
        self, draft: LedgerDraft, limits: RateLimits, *, floor: int = 0
    ) -> tuple[LedgerEntry, RateUse]:
        async with self._write() as db:
            now = _now()
            [window] = await _rows(
                db,
                "SELECT count(*), coalesce(sum(prompt_tokens + completion_tokens), 0), min(created_at) "
                "FROM ledger WHERE key_id = ? AND kind IN ('reservation', 'charge') AND created_at > ?",
                (draft.key_id, now - WINDOW_MS),
            )
            [(concurrent,)] = await _rows(
                db,
                "SELECT count(*) FROM ledger WHERE key_id = ? AND kind = 'reservation' AND created_at > ?",
                (draft.key_id, now - IN_FLIGHT_MS),
            )
            requests, tokens, oldest = (
                window[0] + 1,
                window[1] + draft.prompt_tokens + draft.completion_tokens,
                window[2],
            )
            reset = max(0.0, ((oldest or now) + WINDOW_MS - now) / 1000)
            use = RateUse(requests, tokens, concurrent + 1, reset, reset)
            for limit, used, retry in (
                ("requests_per_minute", requests, reset),
                ("tokens_per_minute", tokens, reset),
                ("concurrent_requests", concurrent + 1, 1.0),
            ):
                allowed = getattr(limits, limit)
                if allowed is not None and used > allowed:
                    raise RateLimitExceeded(limit, allowed, retry, use)
            balance = await _balance(db, draft.user_id)
            after = balance + draft.amount
            if draft.amount < 0 and after < floor:
                raise InsufficientBalance(balance, draft.amount)
            await _rows(db, "UPDATE users SET balance = ? WHERE id = ?", (after, draft.user_id))
            values = msgspec.structs.asdict(draft)
            row = await _insert(
                db, "ledger", {**values, "balance_after": after, "created_at": now, "updated_at": now}
            )
        return _record(LedgerEntry, row), use

    async def post_ledger(self, draft: LedgerDraft, *, floor: int | None = 0) -> LedgerEntry:
        async with self._write() as db:
            balance = await _balance(db, draft.user_id)
            after = balance + draft.amount
            if floor is not None and draft.amount < 0 and after < floor:
                raise InsufficientBalance(balance, draft.amount)
            await _rows(db, "UPDATE users SET balance = ? WHERE id = ?", (after, draft.user_id))
            now = _now()
            values = msgspec.structs.asdict(draft)
            row = await _insert(
                db, "ledger", {**values, "balance_after": after, "created_at": now, "updated_at": now}
            )
        return _record(LedgerEntry, row)

    async def settle_ledger(self, entry_id: int, settlement: LedgerSettlement) -> LedgerEntry:
        async with self._write() as db:
            entry = _found(
                await _rows(db, "SELECT user_id, amount FROM ledger WHERE id = ?", (entry_id,)),
                "ledger entry",
                entry_id,
            )
            [(after,)] = await _rows(
                db,
                "UPDATE users SET balance = balance + ? WHERE id = ? RETURNING balance",
                (settlement.amount - entry["amount"], entry["user_id"]),
            )
            values = msgspec.structs.asdict(settlement)
            [row] = await _update(
                db, "ledger", entry_id, {**values, "balance_after": after, "updated_at": _now()}
            )
        return _record(LedgerEntry, row)

    async def usage_by_day(
        self, since: datetime, *, user_id: int | None = None, key_id: int | None = None
    ) -> list[UsageDay]:
        sql = (
            "SELECT date(created_at / 1000, 'unixepoch') AS day, user_id, key_id, count(*) AS requests, "
            "sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens, "
            "-sum(amount) AS cost FROM ledger WHERE kind = 'charge' AND created_at >= ?"
        )
        params: list[Any] = [_ms(since)]
        if user_id is not None:
            sql += " AND user_id = ?"
            params.append(user_id)
        if key_id is not None:
            sql += " AND key_id = ?"
            params.append(key_id)
        rows = await self._fetch(sql + " GROUP BY day, user_id, key_id ORDER BY day, user_id, key_id", params)
        return [UsageDay(**dict(row)) for row in rows]

    async def stale_reservations(self, created_before: datetime) -> list[LedgerEntry]:
        rows = await self._fetch(
            "SELECT * FROM ledger WHERE kind = 'reservation' AND created_at < ?"
            " AND NOT EXISTS (SELECT 1 FROM messages WHERE messages.ledger_id = ledger.id) ORDER BY id",
            (_ms(created_before),),
        )
        return [_record(LedgerEntry, row) for row in rows]

    async def get_ledger_entry(self, entry_id: int) -> LedgerEntry:
        rows = await self._fetch("SELECT * FROM ledger WHERE id = ?", (entry_id,))
        return _record(LedgerEntry, _found(rows, "ledger entry", entry_id))

    async def list_ledger(self, user_id: int, limit: int = 100) -> list[LedgerEntry]:
        rows = await self._fetch(
            "SELECT * FROM ledger WHERE user_id = ? ORDER BY id DESC LIMIT ?", (user_id, limit)
        )
        return [_record(LedgerEntry, row) for row in rows]

    # conversations

    async def create_conversation(
        self, user_id: int, kind: str, name: str = "", series_id: int | None = None
    ) -> Conversation:
        values = {"user_id": user_id, "kind": kind, "name": name, "series_id": series_id}
        async with self._write() as db:
            now = _now()
            await _balance(db, user_id)
            row = await _insert(db, "conversations", {**values, "created_at": now, "updated_at": now})
        return _record(Conversation, row)

    async def get_conversation(self, conversation_id: int) -> Conversation:
        rows = await self._fetch("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        return _record(Conversation, _found(rows, "conversation", conversation_id))

    async def list_conversations(
        self, user_id: int, kind: str | None = None, series_id: int | None = None
    ) -> list[Conversation]:
        filters: dict[str, Any] = {"user_id": user_id, "kind": kind, "series_id": series_id}
        filters = {column: value for column, value in filters.items() if value is not None}
        where = " AND ".join(f"{column} = ?" for column in filters)
        rows = await self._fetch(
            f"SELECT * FROM conversations WHERE {where} ORDER BY id", list(filters.values())
        )
        return [_record(Conversation, row) for row in rows]

    async def update_conversation(self, conversation_id: int, patch: ConversationPatch) -> Conversation:
        async with self._write() as db:
            rows = await _update(db, "conversations", conversation_id, {**_set(patch), "updated_at": _now()})
        return _record(Conversation, _found(rows, "conversation", conversation_id))

    async def delete_conversation(self, conversation_id: int) -> Conversation:
        async with self._write() as db:
            # Messages go with it through ON DELETE CASCADE.
            rows = await _rows(db, "DELETE FROM conversations WHERE id = ? RETURNING *", (conversation_id,))
        return _record(Conversation, _found(rows, "conversation", conversation_id))

    # messages

    async def append_message(self, conversation_id: int, draft: MessageDraft) -> Message:
        async with self._write() as db:
            now = _now()  # under the write lock, so timestamps follow ids across processes too
            bumped = await _rows(
                db,
                "UPDATE conversations SET updated_at = ? WHERE id = ? RETURNING id",
                (now, conversation_id),
            )
            _found(bumped, "conversation", conversation_id)
            values = msgspec.structs.asdict(draft)
            row = await _insert(
                db,
                "messages",
                {**values, "conversation_id": conversation_id, "created_at": now, "updated_at": now},
            )
        return _record(Message, row)

    async def update_message(self, message_id: int, patch: MessagePatch) -> Message:
        async with self._write() as db:
            rows = await _update(db, "messages", message_id, {**_set(patch), "updated_at": _now()})
        return _record(Message, _found(rows, "message", message_id))

    async def get_message(self, message_id: int) -> Message:
        rows = await self._fetch("SELECT * FROM messages WHERE id = ?", (message_id,))
        return _record(Message, _found(rows, "message", message_id))

    async def list_messages(self, conversation_id: int) -> list[Message]:
        rows = await self._fetch(
            "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
        )
        return [_record(Message, row) for row in rows]

    async def interrupt_stale_generations(self, updated_before: datetime) -> list[Message]:
        async with self._write() as db:
            rows = await _rows(
                db,
                "UPDATE messages SET status = 'interrupted', updated_at = ?"
                " WHERE status = 'generating' AND updated_at < ? RETURNING *",
                # Stamps are whole milliseconds, so stamp < cutoff exactly when
                # stamp < the cutoff rounded up to a whole millisecond.
                (_now(), -((_EPOCH - updated_before) // _MS)),
            )
        return sorted((_record(Message, row) for row in rows), key=lambda m: m.id)

    # plumbing

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError(f"sqlite store {self.path} is not open")
        return self._db

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        async with self._lock:
            return await _rows(self._connection(), sql, params)

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock, _transaction(self._connection()) as db:
            yield db


@hookimpl
def register_stores() -> list[type[Store]]:
    return [SqliteStore]


async def migrate(conn: aiosqlite.Connection, target: int | None = None) -> int:
    """Apply forward migrations until the schema is at ``target`` (default: the latest).

    Each migration runs in its own ``BEGIN IMMEDIATE`` transaction that
    re-reads the version first, so workers opening a fresh file at once
    apply each migration exactly once. Returns the version reached; raises
    :class:`~core.errors.StoreError` for a database newer than this code.
    """
    target = LATEST_VERSION if target is None else target
    if not 0 <= target <= LATEST_VERSION:
        raise ValueError(f"no schema version {target}; this chatgate knows 0..{LATEST_VERSION}")
    while True:
        async with _transaction(conn):
            version = await _schema_version(conn)
            if version >= target:
                return version
            for statement in _statements(MIGRATIONS[version]):
                await _rows(conn, statement)
            await _rows(conn, f"PRAGMA user_version = {version + 1}")


async def _schema_version(conn: aiosqlite.Connection, database: str = "the database") -> int:
    [(version,)] = await _rows(conn, "PRAGMA user_version")
    if version > LATEST_VERSION:
        raise StoreError(
            f"{database} is at schema version {version}, but this chatgate supports"
            f" up to version {LATEST_VERSION}; upgrade chatgate to open it"
        )
    return int(version)


@asynccontextmanager
async def _transaction(conn: aiosqlite.Connection) -> AsyncIterator[aiosqlite.Connection]:
    # BEGIN sits inside the try: if the caller is cancelled while it is queued,
    # it still runs on the connection thread and must be rolled back.
    try:
        await _rows(conn, "BEGIN IMMEDIATE")
        yield conn
        await conn.commit()
    except BaseException:
        await conn.rollback()
        raise


async def _rows(conn: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
    return list(await conn.execute_fetchall(sql, params))


async def _balance(db: aiosqlite.Connection, user_id: int) -> int:
    rows = await _rows(db, "SELECT balance FROM users WHERE id = ?", (user_id,))
    return int(_found(rows, "user", user_id)["balance"])


async def _insert(db: aiosqlite.Connection, table: str, values: dict[str, Any]) -> sqlite3.Row:
    # Column names come from struct fields, never from callers' data.
    columns = ", ".join(values)
    marks = ", ".join("?" * len(values))
    [row] = await _rows(
        db, f"INSERT INTO {table} ({columns}) VALUES ({marks}) RETURNING *", list(values.values())
    )
    return row


async def _update(
    db: aiosqlite.Connection, table: str, row_id: int, values: dict[str, Any]
) -> list[sqlite3.Row]:
    assignments = ", ".join(f"{column} = ?" for column in values)
    return await _rows(
        db, f"UPDATE {table} SET {assignments} WHERE id = ? RETURNING *", [*values.values(), row_id]
    )


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


WINDOW_MS = 60_000  # the sliding minute of rate limits
IN_FLIGHT_MS = 15 * 60_000  # an older unsettled reservation belongs to a crashed process


def _now() -> int:
    return _ms(utcnow())


def _ms(moment: datetime) -> int:
    return (moment - _EPOCH) // _MS
