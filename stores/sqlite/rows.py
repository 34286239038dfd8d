"""Rows to records and back: the small SQL helpers every call on the store's thread uses.

Times are stored as INTEGER milliseconds since the epoch (UTC); a column whose
name ends in ``_at`` holds one. Table and column names in the SQL built here
come from this package and from struct fields, never from callers' data.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import msgspec
from msgspec import UNSET

from core import ApiKey, NotFound, RateLimits, utcnow

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)
_R = TypeVar("_R", bound=msgspec.Struct)


def fetch(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
    return conn.execute(sql, params).fetchall()


def found(rows: list[sqlite3.Row], kind: str, row_id: int) -> sqlite3.Row:
    if not rows:
        raise NotFound(f"{kind} {row_id} not found")
    return rows[0]


def record(cls: type[_R], row: sqlite3.Row) -> _R:
    # Columns carry the struct's field names; *_at columns are ms timestamps.
    if cls is ApiKey:
        limits = RateLimits(row["requests_per_minute"], row["tokens_per_minute"], row["concurrent_requests"])
        return cls(**{**_values(ApiKey, row, ("limits",)), "limits": limits})
    return cls(**_values(cls, row))


def _values(cls: type[msgspec.Struct], row: sqlite3.Row, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    values = {field: row[field] for field in cls.__struct_fields__ if field not in skip}
    for field in values:
        if field.endswith("_at") and values[field] is not None:
            values[field] = EPOCH + values[field] * MS
    if "favorite" in values:
        values["favorite"] = bool(values["favorite"])
    return values


def by_id(db: sqlite3.Connection, cls: type[_R], table: str, row_id: int, kind: str) -> _R:
    # Table names come from this package, never from callers' data.
    return record(cls, found(fetch(db, f"SELECT * FROM {table} WHERE id = ?", (row_id,)), kind, row_id))


def first(db: sqlite3.Connection, cls: type[_R], sql: str, params: Sequence[Any] = ()) -> _R | None:
    rows = fetch(db, sql, params)
    return record(cls, rows[0]) if rows else None


def all_of(db: sqlite3.Connection, cls: type[_R], sql: str, params: Sequence[Any] = ()) -> list[_R]:
    return [record(cls, row) for row in fetch(db, sql, params)]


def insert(db: sqlite3.Connection, table: str, values: dict[str, Any]) -> sqlite3.Row:
    # Column names come from struct fields, never from callers' data.
    columns = ", ".join(values)
    marks = ", ".join("?" * len(values))
    [row] = fetch(db, f"INSERT INTO {table} ({columns}) VALUES ({marks}) RETURNING *", list(values.values()))
    return row


def update(db: sqlite3.Connection, table: str, row_id: int, values: dict[str, Any]) -> list[sqlite3.Row]:
    assignments = ", ".join(f"{column} = ?" for column in values)
    return fetch(db, f"UPDATE {table} SET {assignments} WHERE id = ? RETURNING *", [*values.values(), row_id])


def assigned(patch: msgspec.Struct) -> dict[str, Any]:
    return {key: value for key, value in msgspec.structs.asdict(patch).items() if value is not UNSET}


def write_one(
    db: sqlite3.Connection, cls: type[_R], sql: str, params: Sequence[Any], kind: str, row_id: int
) -> _R:
    return record(cls, found(fetch(db, sql, params), kind, row_id))


def update_one(
    db: sqlite3.Connection, cls: type[_R], table: str, row_id: int, values: dict[str, Any], kind: str
) -> _R:
    return record(cls, found(update(db, table, row_id, values), kind, row_id))


def balance_of(db: sqlite3.Connection, user_id: int) -> int:
    rows = fetch(db, "SELECT balance FROM users WHERE id = ?", (user_id,))
    return int(found(rows, "user", user_id)["balance"])


def now_ms() -> int:
    return to_ms(utcnow())


def to_ms(moment: datetime) -> int:
    return (moment - EPOCH) // MS
