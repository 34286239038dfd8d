"""Dumping and loading whole tables (what makes the store a :class:`~core.CopyableStore`).

Calls that run on the store's thread, each one whole call. Rows travel as
:data:`~core.COPIED_COLUMNS` says: times as aware datetimes (stored here as INTEGER
milliseconds), ``favorite`` as a bool (stored as 0 or 1). Table and column names in
the SQL built here come from ``COPIED_COLUMNS``, never from callers' data.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any

from core import COPIED_COLUMNS, MICRO, StoreTotals

from .rows import EPOCH, MS, fetch, to_ms

BATCH = 1000
"""Rows per batch: one read or one write transaction each."""

AUTOINCREMENT = ("conversations", "messages")
"""Tables whose ids are never reused (see the schema): their high-water mark is in
``sqlite_sequence``. Rows of the other tables are never deleted, so their next id,
the largest one plus one, is above every id they gave out."""


def key_of(table: str) -> tuple[str, ...]:
    """The columns that order ``table``'s rows and tell them apart."""
    return ("id",) if "id" in COPIED_COLUMNS[table] else ("key_id", "second")


def dump_batch(db: sqlite3.Connection, table: str, after: tuple[Any, ...] | None) -> list[dict[str, Any]]:
    """Up to :data:`BATCH` rows of ``table`` whose key follows ``after`` (None: from the first)."""
    columns = COPIED_COLUMNS[table]
    key = ", ".join(key_of(table))
    where = "" if after is None else f" WHERE ({key}) > ({', '.join('?' * len(after))})"
    sql = f"SELECT {', '.join(columns)} FROM {table}{where} ORDER BY {key} LIMIT {BATCH}"
    return [_exported(row) for row in fetch(db, sql, after or ())]


def load(db: sqlite3.Connection, table: str, rows: list[dict[str, Any]]) -> None:
    columns = COPIED_COLUMNS[table]
    marks = ", ".join("?" * len(columns))
    values = [[_stored(column, row[column]) for column in columns] for row in rows]
    if table != "messages":
        db.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", values)
        return
    # The insert trigger moves each conversation's revision and stamps the message with
    # it; the copied revisions are put back (writing only ``revision`` fires no trigger).
    conversation_ids = sorted({row["conversation_id"] for row in rows})
    revisions = fetch(
        db,
        f"SELECT revision, id FROM conversations WHERE id IN ({', '.join('?' * len(conversation_ids))})",
        conversation_ids,
    )
    db.executemany(f"INSERT INTO messages ({', '.join(columns)}) VALUES ({marks})", values)
    db.executemany("UPDATE messages SET revision = ? WHERE id = ?", [(r["revision"], r["id"]) for r in rows])
    db.executemany("UPDATE conversations SET revision = ? WHERE id = ?", [tuple(r) for r in revisions])


def is_empty(db: sqlite3.Connection) -> bool:
    return not any(fetch(db, f"SELECT 1 FROM {table} LIMIT 1") for table in COPIED_COLUMNS)


def last_ids(db: sqlite3.Connection) -> dict[str, int]:
    found = {}
    for table, columns in COPIED_COLUMNS.items():
        if "id" in columns:
            [(largest,)] = fetch(db, f"SELECT coalesce(max(id), 0) FROM {table}")
            found[table] = max(largest, _sequence(db, table))
    return found


def after_load(db: sqlite3.Connection, last: Mapping[str, int]) -> None:
    for table in AUTOINCREMENT:
        [(largest,)] = fetch(db, f"SELECT coalesce(max(id), 0) FROM {table}")
        high = max(largest, last.get(table, 0), _sequence(db, table))
        # sqlite_sequence has a row per AUTOINCREMENT table once it had one; not before.
        if not db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = ?", (high, table)).rowcount:
            db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, high))


def totals(db: sqlite3.Connection) -> StoreTotals:
    rows = {table: fetch(db, f"SELECT count(*) FROM {table}")[0][0] for table in COPIED_COLUMNS}
    return StoreTotals(rows, _sum(db, "users", "balance"), _sum(db, "ledger", "amount"))


def _sum(db: sqlite3.Connection, table: str, column: str) -> int:
    # Whole credits and micro-credits apart: SQLite's integer sum fails past 2^63, and
    # enough balances near the ceiling could pass it.
    [(credits, micro)] = fetch(
        db, f"SELECT coalesce(sum({column} / {MICRO}), 0), coalesce(sum({column} % {MICRO}), 0) FROM {table}"
    )
    return int(credits) * MICRO + int(micro)


def _sequence(db: sqlite3.Connection, table: str) -> int:
    if table not in AUTOINCREMENT:
        return 0
    rows = fetch(db, "SELECT seq FROM sqlite_sequence WHERE name = ?", (table,))
    return int(rows[0][0]) if rows else 0


def _exported(row: sqlite3.Row) -> dict[str, Any]:
    values = dict(zip(row.keys(), row, strict=True))
    for column, value in values.items():
        if column.endswith("_at") and value is not None:
            values[column] = EPOCH + value * MS
    if "favorite" in values:
        values["favorite"] = bool(values["favorite"])
    return values


def _stored(column: str, value: Any) -> Any:
    if column.endswith("_at") and value is not None:
        return to_ms(value)
    if column == "favorite":
        return int(value)
    return value
