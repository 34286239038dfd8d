"""Copying everything one store holds into another, empty one: ``chatgate store copy``.

Both stores must be :class:`~core.store.CopyableStore`. Tables are copied in the order
of :data:`~core.store.COPIED_COLUMNS` (a row refers only to rows copied before it), one
batch of rows at a time, keeping ids; then the target's id sequences are moved past
the source's, and the two are compared: row counts, the sum of balances and the sum
of the ledger's amounts must match, or the copy fails loudly.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import ChatgateError
from .money import format_amount
from .store import CopyableStore, Store, StoreTotals

Progress = Callable[[str, int], None]
"""Called after each batch with the table and how many of its rows are copied so far."""


class StoreCopyError(ChatgateError):
    """A copy refused before it wrote anything, or one that failed or does not match its source."""


async def copy_store(source: Store, target: Store, *, progress: Progress | None = None) -> dict[str, int]:
    """Copy every row of ``source`` into the empty ``target``; return the rows copied per table.

    Raises :class:`StoreCopyError`, having written nothing, when either store is not a
    :class:`~core.store.CopyableStore` or ``target`` holds a row; and when copying fails
    or what ``target`` holds afterwards differs from ``source`` (then the target holds
    a partial or mismatched copy, and the message says so).
    """
    source, target = _copyable(source, "source"), _copyable(target, "target")
    if not await target.is_empty():
        raise StoreCopyError(
            "the target store is not empty; copy only into a new store (a new SQLite file, or an empty "
            "PostgreSQL schema), so no row of it is overwritten or mixed with the copied ones"
        )
    last_ids = await source.last_ids()
    copied: dict[str, int] = {}
    balances = ledger = 0
    for table in CopyableStore.TABLES:
        count = 0
        try:
            async for rows in source.dump(table):
                await target.load(table, rows)
                count += len(rows)
                if table == "users":
                    balances += sum(row["balance"] for row in rows)
                elif table == "ledger":
                    ledger += sum(row["amount"] for row in rows)
                if progress is not None:
                    progress(table, count)
        except Exception as exc:  # a driver's error too: the operator must learn the target is partial
            raise StoreCopyError(
                f"copying table {table} failed after {count} of its rows: {exc}; the target now holds "
                "part of the source: empty it (delete the file, or drop the schema) before copying again"
            ) from exc
        copied[table] = count
    await target.after_load(last_ids)
    _verify(StoreTotals(copied, balances, ledger), await source.totals(), await target.totals())
    return copied


def _copyable(store: Store, role: str) -> CopyableStore:
    if not isinstance(store, CopyableStore):
        raise StoreCopyError(
            f"the {role} store (plugin {store.name!r}) cannot be copied: it does not implement CopyableStore"
        )
    return store


def _verify(copied: StoreTotals, source: StoreTotals, target: StoreTotals) -> None:
    if target != copied:
        raise StoreCopyError(
            f"the target does not hold what was copied: {_differences(copied, target)}; empty it "
            "before copying again"
        )
    if source != copied:
        raise StoreCopyError(
            f"the source changed while it was copied (was chatgate serving from it?): "
            f"{_differences(copied, source)}; stop every server using it, empty the target and copy again"
        )


def _differences(expected: StoreTotals, found: StoreTotals) -> str:
    wrong = [
        f"{table} {expected.rows.get(table, 0)} rows copied, {found.rows.get(table, 0)} found"
        for table in CopyableStore.TABLES
        if expected.rows.get(table, 0) != found.rows.get(table, 0)
    ]
    for what, copied, now in (
        ("balances", expected.balances, found.balances),
        ("ledger amounts", expected.ledger, found.ledger),
    ):
        if copied != now:
            wrong.append(f"{what} sum to {format_amount(copied)} copied, {format_amount(now)} found")
    return "; ".join(wrong)
