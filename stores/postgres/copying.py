"""Dumping and loading whole tables (what makes the store a :class:`~core.CopyableStore`).

Each function runs inside a call the store made (a load inside its write
transaction). Rows travel as :data:`~core.COPIED_COLUMNS` says, which is how
asyncpg reads and writes these columns already (``timestamptz`` as aware
datetimes, ``boolean`` as bool). Table and column names in the SQL built here come
from ``COPIED_COLUMNS``, never from callers' data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg

from core import COPIED_COLUMNS, StoreTotals

BATCH = 1000
"""Rows per batch: one read or one write transaction each."""


def key_of(table: str) -> tuple[str, ...]:
    """The columns that order ``table``'s rows and tell them apart."""
    return ("id",) if "id" in COPIED_COLUMNS[table] else ("key_id", "second")


async def dump_batch(
    conn: asyncpg.Connection, table: str, after: tuple[Any, ...] | None
) -> list[dict[str, Any]]:
    """Up to :data:`BATCH` rows of ``table`` whose key follows ``after`` (None: from the first)."""
    key = ", ".join(key_of(table))
    params = list(after or ())
    marks = ", ".join(f"${n}" for n in range(1, len(params) + 1))
    where = "" if after is None else f" WHERE ({key}) > ({marks})"
    sql = f"SELECT {', '.join(COPIED_COLUMNS[table])} FROM {table}{where} ORDER BY {key} LIMIT {BATCH}"
    return [dict(row) for row in await conn.fetch(sql, *params)]


async def load(conn: asyncpg.Connection, table: str, rows: list[dict[str, Any]]) -> None:
    columns = COPIED_COLUMNS[table]
    marks = ", ".join(f"${n}" for n in range(1, len(columns) + 1))
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"
    values = [[row[column] for column in columns] for row in rows]
    if table != "messages":
        await conn.executemany(sql, values)
        return
    # messages_stamp would move each conversation's revision and overwrite the message's: off
    # while the copied ones go in. ALTER TABLE is transactional, so it is back on at the end
    # of this transaction whatever happens (and nobody else saw it off, behind its lock).
    await conn.execute("ALTER TABLE messages DISABLE TRIGGER messages_stamp")
    await conn.executemany(sql, values)
    await conn.execute("ALTER TABLE messages ENABLE TRIGGER messages_stamp")


async def is_empty(conn: asyncpg.Connection) -> bool:
    exists = " OR ".join(f"EXISTS (SELECT 1 FROM {table})" for table in COPIED_COLUMNS)
    return not await conn.fetchval(f"SELECT {exists}")


async def last_ids(conn: asyncpg.Connection) -> dict[str, int]:
    found = {}
    for table in _with_ids():
        # The identity's last value counts ids given to rows deleted since (NULL: none given yet).
        found[table] = await conn.fetchval(
            f"SELECT greatest(coalesce(max(id), 0),"
            f" coalesce(pg_sequence_last_value(pg_get_serial_sequence('{table}', 'id')::regclass), 0))"
            f" FROM {table}"
        )
    return found


async def after_load(conn: asyncpg.Connection, last: Mapping[str, int]) -> None:
    for table in _with_ids():
        sequence = f"pg_get_serial_sequence('{table}', 'id')"
        # Never backwards: ids this store gave out before it was emptied stay spent too.
        # setval(.., n) makes the next id n + 1; a sequence never goes below 1, so an empty
        # table that never gave out an id keeps its fresh sequence.
        high = f"greatest(max(id), $1::bigint, pg_sequence_last_value({sequence}::regclass))"
        await conn.execute(
            f"SELECT setval({sequence}, {high}) FROM {table} HAVING {high} > 0", last.get(table, 0)
        )


async def totals(conn: asyncpg.Connection) -> StoreTotals:
    counts = ", ".join(f"(SELECT count(*) FROM {table})" for table in COPIED_COLUMNS)
    row = await conn.fetchrow(
        f"SELECT ARRAY[{counts}], (SELECT coalesce(sum(balance), 0) FROM users),"
        " (SELECT coalesce(sum(amount), 0) FROM ledger)"
    )
    assert row is not None
    rows, balances, ledger = row
    return StoreTotals(dict(zip(COPIED_COLUMNS, rows, strict=True)), int(balances), int(ledger))


def _with_ids() -> list[str]:
    return [table for table, columns in COPIED_COLUMNS.items() if "id" in columns]
