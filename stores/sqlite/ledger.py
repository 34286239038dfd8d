"""The ledger: admission within rate limits, postings, settlements and leases.

The calls that run on the store's thread, each one whole call. A key's sliding
minute is kept as per-second counts in ``rate_window`` (at most 60 rows a key),
not read from the ledger; usage without a key is counted from the user's keyless
entries themselves (index ``ledger_keyless``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import msgspec

from core import (
    COUNTED_KINDS,
    DAY_MS,
    IN_FLIGHT_MS,
    MAX_BALANCE,
    OPEN_KINDS,
    WINDOW_MS,
    BalanceTooLarge,
    InsufficientBalance,
    LeaseReleased,
    LedgerDraft,
    LedgerEntry,
    LedgerSettlement,
    RateLimitExceeded,
    RateLimits,
    RateUse,
    StoreError,
    refuse_past,
)

from .rows import EPOCH, MS, balance_of, by_id, found, now_ms


def admit(
    db: sqlite3.Connection, draft: LedgerDraft, limits: RateLimits, floor: int, owner: str | None = None
) -> tuple[LedgerEntry, RateUse]:
    now = now_ms()
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
    refuse_past(limits, use)
    return _post(db, draft, floor, now, owner), use


def admit_keyless(
    db: sqlite3.Connection,
    draft: LedgerDraft,
    limits: RateLimits,
    floor: int,
    tokens_per_day: int | None,
    owner: str | None = None,
) -> tuple[LedgerEntry, RateUse]:
    # Usage without a key is counted from the user's keyless entries themselves (index
    # ledger_keyless): no rate_window rows, and the day's tokens need the entries anyway.
    now = now_ms()
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
    refuse_past(limits, use)
    if tokens_per_day is not None and day >= tokens_per_day:
        retry = _day_frees(db, draft, now, tokens_per_day)
        raise RateLimitExceeded("tokens_per_day", tokens_per_day, retry, use)
    return _post(db, draft, floor, now, owner), use


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


def post_ledger(
    db: sqlite3.Connection, draft: LedgerDraft, floor: int | None, owner: str | None = None
) -> LedgerEntry:
    return _post(db, draft, floor, now_ms(), owner)


def _post(
    db: sqlite3.Connection, draft: LedgerDraft, floor: int | None, now: int, owner: str | None = None
) -> LedgerEntry:
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
        balance = balance_of(db, draft.user_id)
        if draft.amount > 0:
            raise BalanceTooLarge(balance, draft.amount)
        raise InsufficientBalance(balance, draft.amount)
    after = moved[0][0]
    # Only what stays open belongs to the process that posted it (core.cluster).
    owner = owner if draft.kind in OPEN_KINDS else None
    values = (*msgspec.structs.astuple(draft), after, now, now, owner)
    [(entry_id,)] = db.execute(_INSERT_LEDGER, values).fetchall()
    if draft.key_id is not None and draft.kind in COUNTED_KINDS:
        _count(db, draft.key_id, now, draft.requests, draft.prompt_tokens + draft.completion_tokens)
    stamp = EPOCH + now * MS
    d = draft  # the entry is what was inserted: no need to read it back
    return LedgerEntry(
        entry_id, d.user_id, d.amount, after, d.kind, d.key_id, d.model, d.provider, d.prompt_tokens,
        d.completion_tokens, d.latency_ms, d.outcome, d.note, stamp, stamp, d.requests,
    )  # fmt: skip


_INSERT_LEDGER = (
    f"INSERT INTO ledger ({', '.join(LedgerDraft.__struct_fields__)}, balance_after, created_at, updated_at,"
    f" owner) VALUES ({', '.join('?' * (len(LedgerDraft.__struct_fields__) + 4))}) RETURNING id"
)
_LEDGER_COLUMNS = ", ".join(LedgerEntry.__struct_fields__)
_SETTLE_LEDGER = (
    f"UPDATE ledger SET {', '.join(f'{field} = ?' for field in LedgerSettlement.__struct_fields__)},"
    f" balance_after = ?, updated_at = ? WHERE id = ? RETURNING {_LEDGER_COLUMNS}"
)


def _ledger_entry(row: Sequence[Any]) -> LedgerEntry:
    # Columns in field order (_LEDGER_COLUMNS): the two stamps, then requests, come last.
    return LedgerEntry(*row[:13], EPOCH + row[13] * MS, EPOCH + row[14] * MS, row[15])  # type: ignore[call-arg]


def settle_ledger(db: sqlite3.Connection, entry_id: int, settlement: LedgerSettlement) -> LedgerEntry:
    old = found(
        db.execute(
            "SELECT amount, user_id, key_id, kind, prompt_tokens, completion_tokens, created_at"
            " FROM ledger WHERE id = ?",
            (entry_id,),
        ).fetchall(),
        "ledger entry",
        entry_id,
    )
    amount, user_id, key_id, kind, prompt_tokens, completion_tokens, created_at = old
    if kind != "reservation":  # settled already: the first settlement stands
        return by_id(db, LedgerEntry, "ledger", entry_id, "ledger entry")
    [(after,)] = db.execute(
        "UPDATE users SET balance = balance + ? WHERE id = ? RETURNING balance",
        (settlement.amount - amount, user_id),
    ).fetchall()
    values = (*msgspec.structs.astuple(settlement), after, now_ms(), entry_id)
    [row] = db.execute(_SETTLE_LEDGER, values).fetchall()
    if key_id is not None:
        # The minute the entry was counted in now counts what it really used.
        was = kind in COUNTED_KINDS
        now = settlement.kind in COUNTED_KINDS
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


# --- leases: what makes SqliteStore a LeaseStore ---

_INSERT_CHARGE = _INSERT_LEDGER.removesuffix(" RETURNING id")


def _open_lease(db: sqlite3.Connection, lease_id: int) -> tuple[int, int, int | None, int] | None:
    """A lease's amount still held, user, key and creation time; None once released."""
    rows = db.execute(
        "SELECT amount, user_id, key_id, created_at, kind FROM ledger WHERE id = ?", (lease_id,)
    ).fetchall()
    held, user_id, key_id, created_at, kind = found(rows, "ledger entry", lease_id)
    if kind == "released":
        return None
    if kind != "lease":
        raise StoreError(f"ledger entry {lease_id} is a {kind}, not a lease")
    return held, user_id, key_id, created_at


def charge_lease(
    db: sqlite3.Connection, lease_id: int, charges: list[LedgerDraft], counted_tokens: int
) -> int:
    lease = _open_lease(db, lease_id)
    if lease is None:
        raise LeaseReleased(f"lease {lease_id} was released: its charges must be posted before")
    held, user_id, key_id, created_at = lease
    now = now_ms()
    left = held - sum(charge.amount for charge in charges)  # held and charges are negative
    # Usage beyond the worst case (a prompt longer than estimated) was spent all the same:
    # what the lease cannot cover comes from the balance, with no floor.
    [(balance,)] = db.execute(
        "UPDATE users SET balance = balance - ? WHERE id = ? RETURNING balance", (max(0, left), user_id)
    ).fetchall()
    db.execute("UPDATE ledger SET amount = ?, updated_at = ? WHERE id = ?", (min(0, left), now, lease_id))
    db.executemany(_INSERT_CHARGE, [(*msgspec.structs.astuple(c), balance, now, now, None) for c in charges])
    if key_id is not None:
        # The lease counted its requests when it was posted; their tokens are now known.
        used = sum(charge.prompt_tokens + charge.completion_tokens for charge in charges)
        _count(db, key_id, created_at, 0, used - counted_tokens)
    return int(balance)


def shrink_lease(
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
        (back, requests, now_ms(), lease_id),
    )
    if key_id is not None:
        _count(db, key_id, created_at, -unused_requests, -unused_tokens)


def release_lease(
    db: sqlite3.Connection, lease_id: int, unused_requests: int, unused_tokens: int
) -> LedgerEntry:
    lease = _open_lease(db, lease_id)
    if lease is None:
        return by_id(db, LedgerEntry, "ledger", lease_id, "ledger entry")
    held, user_id, key_id, created_at = lease
    [(after,)] = db.execute(
        "UPDATE users SET balance = balance - ? WHERE id = ? RETURNING balance", (held, user_id)
    ).fetchall()
    [row] = db.execute(
        "UPDATE ledger SET kind = 'released', outcome = 'released', amount = 0, balance_after = ?,"
        " updated_at = ? WHERE id = ?"
        f" RETURNING {_LEDGER_COLUMNS}",
        (after, now_ms(), lease_id),
    ).fetchall()
    if key_id is not None:
        _count(db, key_id, created_at, -unused_requests, -unused_tokens)
    return _ledger_entry(row)
