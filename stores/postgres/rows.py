"""Rows to records and back: the small SQL helpers the PostgreSQL store's calls share.

Table and column names in the SQL built here come from this package and from
struct fields, never from callers' data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import asyncpg
import msgspec
from msgspec import UNSET

from core import ApiKey, NotFound, RateLimits

_R = TypeVar("_R", bound=msgspec.Struct)


def found(row: asyncpg.Record | None, kind: str, row_id: int) -> asyncpg.Record:
    if row is None:
        raise NotFound(f"{kind} {row_id} not found")
    return row


def record(cls: type[_R], row: asyncpg.Record) -> _R:
    """``row`` as a ``cls``: its columns carry the struct's field names."""
    if cls is ApiKey:
        limits = RateLimits(row["requests_per_minute"], row["tokens_per_minute"], row["concurrent_requests"])
        values = {field: row[field] for field in ApiKey.__struct_fields__ if field != "limits"}
        return cls(**values, limits=limits)
    return cls(**{field: row[field] for field in cls.__struct_fields__})


async def first(conn: asyncpg.Connection, cls: type[_R], sql: str, *params: Any) -> _R | None:
    row = await conn.fetchrow(sql, *params)
    return None if row is None else record(cls, row)


async def all_of(conn: asyncpg.Connection, cls: type[_R], sql: str, *params: Any) -> list[_R]:
    return [record(cls, row) for row in await conn.fetch(sql, *params)]


async def by_id(conn: asyncpg.Connection, cls: type[_R], table: str, row_id: int, kind: str) -> _R:
    return record(
        cls, found(await conn.fetchrow(f"SELECT * FROM {table} WHERE id = $1", row_id), kind, row_id)
    )


async def write_one(
    conn: asyncpg.Connection, cls: type[_R], sql: str, params: Sequence[Any], kind: str, row_id: int
) -> _R:
    return record(cls, found(await conn.fetchrow(sql, *params), kind, row_id))


async def insert(conn: asyncpg.Connection, table: str, values: dict[str, Any]) -> asyncpg.Record:
    columns = ", ".join(values)
    marks = ", ".join(f"${n}" for n in range(1, len(values) + 1))
    row = await conn.fetchrow(
        f"INSERT INTO {table} ({columns}) VALUES ({marks}) RETURNING *", *values.values()
    )
    assert row is not None
    return row


async def update(
    conn: asyncpg.Connection, table: str, row_id: int, values: dict[str, Any]
) -> asyncpg.Record | None:
    assignments = ", ".join(f"{column} = ${n}" for n, column in enumerate(values, start=2))
    return await conn.fetchrow(
        f"UPDATE {table} SET {assignments} WHERE id = $1 RETURNING *", row_id, *values.values()
    )


def assigned(patch: msgspec.Struct) -> dict[str, Any]:
    return {key: value for key, value in msgspec.structs.asdict(patch).items() if value is not UNSET}


async def balance_of(conn: asyncpg.Connection, user_id: int) -> int:
    return int(
        found(await conn.fetchrow("SELECT balance FROM users WHERE id = $1", user_id), "user", user_id)[0]
    )
