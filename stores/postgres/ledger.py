"""The ledger on PostgreSQL: admission within rate limits, postings, settlements and leases.

The same rules as :mod:`stores.sqlite.ledger`, made safe for many processes by
locks instead of SQLite's single writer. Each call runs inside a transaction the
store opened (READ COMMITTED), and takes its locks in one order, so concurrent
calls queue rather than deadlock:

1. admission takes a transaction-scoped advisory lock on the key (or, without a
   key, on the user), so counting a key's minute and posting its entry are one
   step across every instance;
2. an existing entry being changed is locked (``FOR UPDATE``) before its user;
3. the user's row (the balance: a conditional ``UPDATE``, never
   read-compare-write);
4. the key's ``rate_window`` rows (always written while holding 3, since a key
   belongs to one user).

Timestamps come from the process's clock (like SQLite's), in whole milliseconds.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
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
    utcnow,
)

from .rows import balance_of, by_id, found, record

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)


def now_ms() -> int:
    return (utcnow() - EPOCH) // MS


def moment(ms: int) -> datetime:
    return EPOCH + ms * MS


def _key_lock(key_id: int) -> int:
    # Advisory lock ids: even for keys, odd for users (usage without a key). A collision with
    # another application's lock in the same database only makes one wait for the other.
    return key_id * 2


def _user_lock(user_id: int) -> int:
    return user_id * 2 + 1


async def admit(
    conn: asyncpg.Connection, draft: LedgerDraft, limits: RateLimits, floor: int, owner: str | None
) -> tuple[LedgerEntry, RateUse]:
    assert draft.key_id is not None
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _key_lock(draft.key_id))
    now = now_ms()  # read after the lock: admissions of a key take their times in order
    first_second = (now - WINDOW_MS) // 1000 + 1
    requests, tokens, oldest, stale, concurrent = await conn.fetchrow(
        "SELECT coalesce(sum(requests) FILTER (WHERE second >= $1), 0),"
        " coalesce(sum(tokens) FILTER (WHERE second >= $1), 0),"
        " min(second) FILTER (WHERE second >= $1), coalesce(min(second) < $1, false),"
        " (SELECT coalesce(sum(requests), 0) FROM ledger"
        "  WHERE key_id = $2 AND kind IN ('reservation', 'lease') AND created_at > $3)"
        " FROM rate_window WHERE key_id = $2",
        first_second,
        draft.key_id,
        moment(now - IN_FLIGHT_MS),
    )
    requests = int(requests) + draft.requests
    tokens = int(tokens) + draft.prompt_tokens + draft.completion_tokens
    concurrent = int(concurrent) + draft.requests
    oldest = now // 1000 if oldest is None else oldest
    reset = max(0.0, (oldest * 1000 + WINDOW_MS - now) / 1000)
    use = RateUse(requests, tokens, concurrent, reset, reset)
    refuse_past(limits, use)
    entry = await _post(conn, draft, floor, now, owner)
    if stale:  # about once a second per busy key, not once a request; after the user's row (order 4)
        await conn.execute(
            "DELETE FROM rate_window WHERE key_id = $1 AND second < $2", draft.key_id, first_second
        )
    return entry, use


async def admit_keyless(
    conn: asyncpg.Connection,
    draft: LedgerDraft,
    limits: RateLimits,
    floor: int,
    tokens_per_day: int | None,
    owner: str | None,
) -> tuple[LedgerEntry, RateUse]:
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _user_lock(draft.user_id))
    now = now_ms()
    since = now - max(IN_FLIGHT_MS, WINDOW_MS, DAY_MS if tokens_per_day is not None else 0)
    requests, tokens, oldest, concurrent, day = await conn.fetchrow(
        "SELECT coalesce(sum(requests) FILTER (WHERE created_at > $2), 0),"
        " coalesce(sum(prompt_tokens + completion_tokens) FILTER (WHERE created_at > $2), 0),"
        " min(created_at) FILTER (WHERE created_at > $2),"
        " coalesce(sum(requests) FILTER (WHERE kind IN ('reservation', 'lease') AND created_at > $3), 0),"
        " coalesce(sum(prompt_tokens + completion_tokens) FILTER (WHERE created_at > $4), 0)"
        " FROM ledger WHERE user_id = $1 AND key_id IS NULL AND kind IN ('reservation', 'lease', 'charge')"
        " AND created_at > $5",
        draft.user_id,
        moment(now - WINDOW_MS),
        moment(now - IN_FLIGHT_MS),
        moment(now - DAY_MS),
        moment(since),
    )
    requests = int(requests) + draft.requests
    tokens = int(tokens) + draft.prompt_tokens + draft.completion_tokens
    concurrent = int(concurrent) + draft.requests
    oldest_ms = now if oldest is None else (oldest - EPOCH) // MS
    reset = max(0.0, (oldest_ms + WINDOW_MS - now) / 1000)
    use = RateUse(requests, tokens, concurrent, reset, reset)
    refuse_past(limits, use)
    if tokens_per_day is not None and int(day) >= tokens_per_day:
        retry = await _day_frees(conn, draft, now, tokens_per_day)
        raise RateLimitExceeded("tokens_per_day", tokens_per_day, retry, use)
    return await _post(conn, draft, floor, now, owner), use


async def _day_frees(conn: asyncpg.Connection, draft: LedgerDraft, now: int, tokens_per_day: int) -> float:
    """Seconds until enough of a user's keyless tokens of the last day are older than a day."""
    rows = await conn.fetch(
        "SELECT created_at, prompt_tokens + completion_tokens FROM ledger"
        " WHERE user_id = $1 AND key_id IS NULL AND kind IN ('reservation', 'lease', 'charge')"
        " AND created_at > $2 ORDER BY created_at",
        draft.user_id,
        moment(now - DAY_MS),
    )
    left = sum(tokens for _, tokens in rows)
    for created_at, tokens in rows:
        left -= tokens
        if left < tokens_per_day:
            return max(0.001, (int((created_at - EPOCH) // MS) + DAY_MS - now) / 1000)
    return DAY_MS / 1000


async def post_ledger(
    conn: asyncpg.Connection, draft: LedgerDraft, floor: int | None, owner: str | None
) -> LedgerEntry:
    return await _post(conn, draft, floor, now_ms(), owner)


_INSERT_LEDGER = (
    f"INSERT INTO ledger ({', '.join(LedgerDraft.__struct_fields__)}, balance_after, created_at, updated_at,"
    f" owner) VALUES ({', '.join(f'${n}' for n in range(1, len(LedgerDraft.__struct_fields__) + 5))})"
)
_LEDGER_COLUMNS = ", ".join(LedgerEntry.__struct_fields__)


async def _post(
    conn: asyncpg.Connection, draft: LedgerDraft, floor: int | None, now: int, owner: str | None
) -> LedgerEntry:
    # The floor and ceiling checks and the move in one conditional statement: concurrent
    # charges re-check the WHERE against the committed balance, so none can overdraw.
    moved = None
    if abs(draft.amount) <= MAX_BALANCE:
        moved = await conn.fetchval(
            # (Casts on the WHERE's parameters: PostgreSQL types them there first.)
            "UPDATE users SET balance = balance + $1 WHERE id = $2"
            " AND ($3::bigint IS NULL OR $1::bigint >= 0 OR balance + $1 >= $3)"
            " AND ($1 <= 0 OR balance + $1 <= $4::bigint)"
            " RETURNING balance",
            draft.amount,
            draft.user_id,
            floor,
            MAX_BALANCE,
        )
    if moved is None:
        balance = await balance_of(conn, draft.user_id)
        if draft.amount > 0:
            raise BalanceTooLarge(balance, draft.amount)
        raise InsufficientBalance(balance, draft.amount)
    stamp = moment(now)
    entry_id = await conn.fetchval(
        _INSERT_LEDGER + " RETURNING id",
        *msgspec.structs.astuple(draft),
        moved,
        stamp,
        stamp,
        owner if draft.kind in OPEN_KINDS else None,  # what stays open belongs to its process (core.cluster)
    )
    if draft.key_id is not None and draft.kind in COUNTED_KINDS:
        await _count(conn, draft.key_id, now, draft.requests, draft.prompt_tokens + draft.completion_tokens)
    d = draft
    return LedgerEntry(
        entry_id, d.user_id, d.amount, moved, d.kind, d.key_id, d.model, d.provider, d.prompt_tokens,
        d.completion_tokens, d.latency_ms, d.outcome, d.note, stamp, stamp, d.requests,
    )  # fmt: skip


async def settle_ledger(conn: asyncpg.Connection, entry_id: int, settlement: LedgerSettlement) -> LedgerEntry:
    old = found(
        await conn.fetchrow(
            "SELECT amount, user_id, key_id, kind, prompt_tokens, completion_tokens, created_at"
            " FROM ledger WHERE id = $1 FOR UPDATE",
            entry_id,
        ),
        "ledger entry",
        entry_id,
    )
    amount, user_id, key_id, kind, prompt_tokens, completion_tokens, created_at = old
    if kind != "reservation":  # settled already (locked above, so by a committed settlement): it stands
        return await by_id(conn, LedgerEntry, "ledger", entry_id, "ledger entry")
    after = await conn.fetchval(
        "UPDATE users SET balance = balance + $1 WHERE id = $2 RETURNING balance",
        settlement.amount - amount,
        user_id,
    )
    fields = LedgerSettlement.__struct_fields__
    assignments = ", ".join(f"{field} = ${n}" for n, field in enumerate(fields, start=1))
    n = len(fields)
    row = await conn.fetchrow(
        f"UPDATE ledger SET {assignments}, balance_after = ${n + 1}, updated_at = ${n + 2}"
        f" WHERE id = ${n + 3} RETURNING {_LEDGER_COLUMNS}",
        *msgspec.structs.astuple(settlement),
        after,
        moment(now_ms()),
        entry_id,
    )
    if key_id is not None:
        # The minute the entry was counted in now counts what it really used.
        was = kind in COUNTED_KINDS
        counts = settlement.kind in COUNTED_KINDS
        tokens = (settlement.prompt_tokens + settlement.completion_tokens) * counts
        tokens -= (prompt_tokens + completion_tokens) * was
        await _count(conn, key_id, (created_at - EPOCH) // MS, counts - was, tokens)
    return record(LedgerEntry, row)


async def _count(conn: asyncpg.Connection, key_id: int, at_ms: int, requests: int, tokens: int) -> None:
    if requests or tokens:
        await conn.execute(
            "INSERT INTO rate_window (key_id, second, requests, tokens) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (key_id, second) DO UPDATE"
            " SET requests = rate_window.requests + excluded.requests,"
            " tokens = rate_window.tokens + excluded.tokens",
            key_id,
            at_ms // 1000,
            requests,
            tokens,
        )


# --- leases: what makes PostgresStore a LeaseStore ---


async def _open_lease(conn: asyncpg.Connection, lease_id: int) -> tuple[int, int, int | None, int] | None:
    """A lease's amount still held, user, key and creation time (ms), locked; None once released."""
    row = await conn.fetchrow(
        "SELECT amount, user_id, key_id, created_at, kind FROM ledger WHERE id = $1 FOR UPDATE", lease_id
    )
    held, user_id, key_id, created_at, kind = found(row, "ledger entry", lease_id)
    if kind == "released":
        return None
    if kind != "lease":
        raise StoreError(f"ledger entry {lease_id} is a {kind}, not a lease")
    return held, user_id, key_id, (created_at - EPOCH) // MS


async def charge_lease(
    conn: asyncpg.Connection, lease_id: int, charges: list[LedgerDraft], counted_tokens: int
) -> int:
    lease = await _open_lease(conn, lease_id)
    if lease is None:
        raise LeaseReleased(f"lease {lease_id} was released: its charges must be posted before")
    held, user_id, key_id, created_at = lease
    stamp = moment(now_ms())
    left = held - sum(charge.amount for charge in charges)  # held and charges are negative
    # What the lease cannot cover was spent all the same: it comes from the balance, no floor.
    balance = await conn.fetchval(
        "UPDATE users SET balance = balance - $1 WHERE id = $2 RETURNING balance", max(0, left), user_id
    )
    await conn.execute(
        "UPDATE ledger SET amount = $1, updated_at = $2 WHERE id = $3", min(0, left), stamp, lease_id
    )
    await conn.executemany(
        _INSERT_LEDGER, [(*msgspec.structs.astuple(c), balance, stamp, stamp, None) for c in charges]
    )
    if key_id is not None:
        used = sum(charge.prompt_tokens + charge.completion_tokens for charge in charges)
        await _count(conn, key_id, created_at, 0, used - counted_tokens)
    return int(balance)


async def shrink_lease(
    conn: asyncpg.Connection,
    lease_id: int,
    requests: int,
    unused_requests: int,
    unused_tokens: int,
    unused_amount: int,
) -> None:
    lease = await _open_lease(conn, lease_id)
    if lease is None:
        return
    held, user_id, key_id, created_at = lease
    back = min(unused_amount, -held)  # never more than it still holds
    await conn.execute("UPDATE users SET balance = balance + $1 WHERE id = $2", back, user_id)
    await conn.execute(
        "UPDATE ledger SET amount = amount + $1, requests = $2, updated_at = $3 WHERE id = $4",
        back,
        requests,
        moment(now_ms()),
        lease_id,
    )
    if key_id is not None:
        await _count(conn, key_id, created_at, -unused_requests, -unused_tokens)


async def release_lease(
    conn: asyncpg.Connection, lease_id: int, unused_requests: int, unused_tokens: int
) -> LedgerEntry:
    lease = await _open_lease(conn, lease_id)
    if lease is None:
        return await by_id(conn, LedgerEntry, "ledger", lease_id, "ledger entry")
    held, user_id, key_id, created_at = lease
    after = await conn.fetchval(
        "UPDATE users SET balance = balance - $1 WHERE id = $2 RETURNING balance", held, user_id
    )
    row = await conn.fetchrow(
        "UPDATE ledger SET kind = 'released', outcome = 'released', amount = 0, balance_after = $1,"
        f" updated_at = $2 WHERE id = $3 RETURNING {_LEDGER_COLUMNS}",
        after,
        moment(now_ms()),
        lease_id,
    )
    if key_id is not None:
        await _count(conn, key_id, created_at, -unused_requests, -unused_tokens)
    return record(LedgerEntry, row)
