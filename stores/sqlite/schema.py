"""The SQLite schema: its forward migrations and the version a file is at.

The version is ``PRAGMA user_version``; :data:`MIGRATIONS` takes it forward one
step at a time, and a file at a version newer than this code is refused rather
than touched. Times are INTEGER milliseconds since the epoch (UTC).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from core import StoreError

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
    # 10: processes sharing the file as one server (core.cluster): who joined, and which of
    # them owns each reservation, lease and reply being generated, so that whoever finds an
    # owner dead takes over exactly what it left. (owner joins messages_changed's list.)
    """
    CREATE TABLE instances (
        id TEXT PRIMARY KEY,
        pid INTEGER NOT NULL,
        host TEXT NOT NULL,
        started_at INTEGER NOT NULL
    );
    ALTER TABLE ledger ADD COLUMN owner TEXT;
    ALTER TABLE messages ADD COLUMN owner TEXT;
    CREATE INDEX ledger_owner ON ledger (owner) WHERE kind IN ('reservation', 'lease');
    CREATE INDEX messages_owner ON messages (owner) WHERE status = 'generating';
    DROP TRIGGER messages_changed;
    CREATE TRIGGER messages_changed AFTER UPDATE OF conversation_id, role, content, reasoning, status, model,
            prompt_tokens, completion_tokens, error, created_at, updated_at, ledger_id, owner
            ON messages BEGIN
        UPDATE conversations SET revision = revision + 1 WHERE id = NEW.conversation_id;
        UPDATE messages SET revision = (SELECT revision FROM conversations WHERE id = NEW.conversation_id)
            WHERE id = NEW.id;
    END;
    """,
    # v11: the sweep of a kind's stale conversations (Store.delete_stale_conversations: stored
    # Responses past their retention) finds them without reading the whole table.
    """
    CREATE INDEX conversations_stale ON conversations (kind, updated_at);
    """,
]
"""Forward migrations; applying ``MIGRATIONS[n]`` takes the schema from version n to n + 1."""

LATEST_VERSION = len(MIGRATIONS)


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
            version = schema_version(conn)
            if version >= target:
                return version
            for statement in _statements(MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")


def schema_version(conn: sqlite3.Connection, database: str = "the database") -> int:
    """The schema version of the file ``conn`` opened; :class:`~core.errors.StoreError` when
    it is newer than this code (``database`` names the file in the message)."""
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
