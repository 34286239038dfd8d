"""The PostgreSQL store: one database shared by every worker and instance.

Built on asyncpg (the faster of the two maintained async drivers, see the
README's "Dependencies and why"). Every call borrows a connection from a pool
and runs in one transaction; writes that lose a deadlock or serialization race
are retried whole, and a caller cancelled mid-write does not abort it (the
write completes or fails as a whole, as SQLite's does). The schema is created
and migrated under an advisory lock on a connection of its own
(:mod:`.schema`), so instances starting together are safe.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import msgspec

from core import (
    MAX_SIGNAL_BYTES,
    ApiKey,
    ClusterStore,
    Conversation,
    ConversationPatch,
    CopyableStore,
    LeaseStore,
    LedgerDraft,
    LedgerEntry,
    LedgerSettlement,
    Message,
    MessageDraft,
    MessagePatch,
    NotFound,
    RateLimits,
    RateUse,
    Receiver,
    StandingWatcher,
    StoreError,
    StoreTotals,
    UsageDay,
    User,
    without_credentials,
)

from . import cluster, copying, ledger
from .rows import all_of, assigned, balance_of, by_id, first, found, insert, record, update, write_one
from .schema import migrate

_T = TypeVar("_T")
log = logging.getLogger("chatgate.store.postgres")
_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_RETRIED = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
_TRIES = 8

USERS = (
    "SELECT id, email, balance - coalesce((SELECT sum(amount) FROM ledger"
    " WHERE ledger.user_id = users.id AND kind = 'lease'), 0)::bigint AS balance, created_at FROM users"
)
"""Users as :class:`~core.User`: what open leases hold and did not spend is theirs."""


class PostgresOptions(msgspec.Struct, forbid_unknown_fields=True):
    """Options of the postgres store.

    ``dsn`` names the database (``postgresql://user:password@host:port/db``;
    write ``"${DATABASE_URL}"`` to take it from the environment). ``schema``
    is where chatgate's tables live (created if missing), so several
    deployments can share one database. ``pool_size`` is the most connections
    one process opens for requests (each process also opens one more, briefly,
    to migrate). ``statement_cache_size`` is asyncpg's prepared-statement cache
    per connection: set it to 0 behind PgBouncer older than 1.21 in
    transaction mode, which cannot keep prepared statements.
    """

    dsn: str = ""
    schema: str = "public"
    pool_size: int = 10
    statement_cache_size: int = 100
    connect_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.dsn.strip():
            raise ValueError(
                'dsn to name the database, e.g. dsn = "postgresql://chatgate@127.0.0.1/chatgate"'
            )
        if not self.dsn.startswith(("postgresql://", "postgres://")):
            raise ValueError("dsn to start with postgresql://")
        if not _SCHEMA.fullmatch(self.schema):
            raise ValueError(f"schema to be a lower-case SQL name (it is {self.schema!r})")
        if self.pool_size < 1:
            raise ValueError(f"pool_size to be >= 1 (it is {self.pool_size})")
        if self.statement_cache_size < 0:
            raise ValueError(f"statement_cache_size to be >= 0 (it is {self.statement_cache_size})")
        if self.connect_timeout_s <= 0:
            raise ValueError(f"connect_timeout_s to be > 0 (it is {self.connect_timeout_s})")


class PostgresStore(LeaseStore, CopyableStore, ClusterStore):
    """Keeps everything in one PostgreSQL database, shared by any number of processes.

    Promises beyond :class:`~core.store.LeaseStore`: admission is exact across
    every process (a key's minute is counted and its entry posted under one
    advisory lock); a balance moves only by conditional updates; a schema
    written by a newer chatgate is refused rather than touched; a caller
    cancelled during a write does not stop it. Like SQLite's, the rate window
    counts whole seconds, and times come from the writing process's clock
    (keep instances' clocks in sync, as NTP does).
    """

    name = "postgres"
    Options = PostgresOptions

    def __init__(self, instance: str, options: PostgresOptions) -> None:
        super().__init__(instance, options)
        self.options: PostgresOptions = options
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()
        self._membership: cluster.Membership | None = None

    def describe(self) -> dict[str, Any]:
        # Never the DSN itself: it may carry a password.
        return {**super().describe(), "schema": self.options.schema}

    # lifecycle

    async def open(self) -> None:
        async with self._opening:
            if self._pool is not None:
                return
            options = self.options
            try:
                conn = await self._connect()
                try:
                    await migrate(conn, options.schema)
                finally:
                    await conn.close()
                self._pool = await asyncpg.create_pool(
                    options.dsn,
                    min_size=min(2, options.pool_size),
                    max_size=options.pool_size,
                    timeout=options.connect_timeout_s,
                    statement_cache_size=options.statement_cache_size,
                    # asyncpg resets a connection it takes back (unlock all, close cursors, UNLISTEN,
                    # RESET ALL): a round trip per call. Pooled connections here keep no session
                    # state (locks are transaction-scoped, LISTEN has its own connection).
                    reset=_keep,
                    server_settings=self._settings(),
                )
            except (TimeoutError, OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise StoreError(
                    f"cannot open the PostgreSQL store at {without_credentials(options.dsn)}: {exc}; "
                    "check [store] dsn and that the server is up"
                ) from exc

    def _settings(self) -> dict[str, str]:
        return {"search_path": f'"{self.options.schema}"', "application_name": f"chatgate {self.instance}"}

    async def _connect(self, settings: dict[str, str] | None = None) -> asyncpg.Connection:
        """A connection of its own, outside the pool (with ``settings`` beside the usual ones)."""
        options = self.options
        return await asyncpg.connect(
            options.dsn,
            timeout=options.connect_timeout_s,
            server_settings={**self._settings(), **(settings or {})},
        )

    async def aclose(self) -> None:
        async with self._opening:
            membership, self._membership = self._membership, None
            if membership is not None:
                await membership.close()
            pool, self._pool = self._pool, None
            if pool is not None:
                await pool.close()

    async def ping(self) -> None:
        await self._read(lambda conn: conn.fetchval("SELECT 1"))

    # users

    async def ensure_user(self, email: str) -> User:
        email = email.strip().lower()
        if not email:
            raise ValueError("email must not be empty")

        async def ensure(conn: asyncpg.Connection) -> User:
            await conn.execute(
                "INSERT INTO users (email, balance, created_at) VALUES ($1, 0, $2)"
                " ON CONFLICT (email) DO NOTHING",
                email,
                ledger.moment(ledger.now_ms()),
            )
            return record(User, await conn.fetchrow(f"{USERS} WHERE email = $1", email))

        return await self._write(ensure)

    async def get_user(self, user_id: int) -> User:
        row = await self._read(lambda conn: conn.fetchrow(f"{USERS} WHERE id = $1", user_id))
        return record(User, found(row, "user", user_id))

    async def find_user(self, email: str) -> User | None:
        return await self._read(
            lambda conn: first(conn, User, f"{USERS} WHERE email = $1", email.strip().lower())
        )

    async def list_users(self) -> list[User]:
        return await self._read(lambda conn: all_of(conn, User, f"{USERS} ORDER BY id"))

    # API keys

    async def create_api_key(self, user_id: int, name: str, prefix: str, key_hash: str) -> ApiKey:
        async def create(conn: asyncpg.Connection) -> ApiKey:
            await balance_of(conn, user_id)  # NotFound for a missing user
            if await conn.fetchval("SELECT 1 FROM api_keys WHERE key_hash = $1", key_hash):
                raise StoreError(f"an api key with this hash already exists (prefix {prefix!r})")
            values = {"user_id": user_id, "name": name, "prefix": prefix, "key_hash": key_hash}
            return record(ApiKey, await insert(conn, "api_keys", {**values, "created_at": _now()}))

        try:
            return await self._write(create)
        except asyncpg.UniqueViolationError as exc:  # the same hash, created at the same moment
            raise StoreError(f"an api key with this hash already exists (prefix {prefix!r})") from exc

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        return await self._read(
            lambda conn: first(conn, ApiKey, "SELECT * FROM api_keys WHERE key_hash = $1", key_hash)
        )

    async def find_api_key_owner(self, key_hash: str) -> tuple[ApiKey, User] | None:
        # One statement, one round trip: what authenticating a request costs when its key is
        # not remembered (a snapshot transaction around two reads was four).
        sql = (
            "SELECT k.*, u.email, u.created_at AS user_created_at, u.balance - coalesce((SELECT sum(amount)"
            " FROM ledger WHERE ledger.user_id = u.id AND kind = 'lease'), 0)::bigint AS user_balance"
            " FROM api_keys k JOIN users u ON u.id = k.user_id WHERE k.key_hash = $1"
        )
        row = await self._read(lambda conn: conn.fetchrow(sql, key_hash))
        if row is None:
            return None
        user = User(row["user_id"], row["email"], row["user_balance"], row["user_created_at"])
        return record(ApiKey, row), user

    async def list_api_keys(self, user_id: int | None = None) -> list[ApiKey]:
        if user_id is None:
            return await self._read(lambda conn: all_of(conn, ApiKey, "SELECT * FROM api_keys ORDER BY id"))
        sql = "SELECT * FROM api_keys WHERE user_id = $1 ORDER BY id"
        return await self._read(lambda conn: all_of(conn, ApiKey, sql, user_id))

    async def revoke_api_key(self, key_id: int) -> ApiKey:
        sql = "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2 RETURNING *"
        return await self._write(
            lambda conn: write_one(conn, ApiKey, sql, (_now(), key_id), "api key", key_id)
        )

    async def set_api_key_limits(self, key_id: int, limits: RateLimits) -> ApiKey:
        sql = (
            "UPDATE api_keys SET requests_per_minute = $1, tokens_per_minute = $2, concurrent_requests = $3"
            " WHERE id = $4 RETURNING *"
        )
        params = (limits.requests_per_minute, limits.tokens_per_minute, limits.concurrent_requests, key_id)
        return await self._write(lambda conn: write_one(conn, ApiKey, sql, params, "api key", key_id))

    # ledger

    async def admit(
        self, draft: LedgerDraft, limits: RateLimits, *, floor: int = 0, tokens_per_day: int | None = None
    ) -> tuple[LedgerEntry, RateUse]:
        if draft.key_id is None:
            return await self._write(
                lambda conn: ledger.admit_keyless(conn, draft, limits, floor, tokens_per_day, self._owner())
            )
        if tokens_per_day is not None:
            raise ValueError("tokens_per_day applies to usage without a key only")
        return await self._write(lambda conn: ledger.admit(conn, draft, limits, floor, self._owner()))

    async def post_ledger(self, draft: LedgerDraft, *, floor: int | None = 0) -> LedgerEntry:
        return await self._write(lambda conn: ledger.post_ledger(conn, draft, floor, self._owner()))

    async def settle_ledger(self, entry_id: int, settlement: LedgerSettlement) -> LedgerEntry:
        return await self._write(lambda conn: ledger.settle_ledger(conn, entry_id, settlement))

    async def usage_by_day(
        self, since: datetime, *, user_id: int | None = None, key_id: int | None = None
    ) -> list[UsageDay]:
        sql = (
            "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, user_id, key_id,"
            " count(*), sum(prompt_tokens), sum(completion_tokens), -sum(amount)"
            " FROM ledger WHERE kind = 'charge' AND created_at >= $1"
        )
        params: list[Any] = [since]
        if user_id is not None:
            params.append(user_id)
            sql += f" AND user_id = ${len(params)}"
        if key_id is not None:
            params.append(key_id)
            sql += f" AND key_id = ${len(params)}"
        sql += " GROUP BY day, user_id, key_id ORDER BY day, user_id, key_id NULLS FIRST"
        rows = await self._read(lambda conn: conn.fetch(sql, *params))
        return [
            UsageDay(day, user, key, requests, int(prompt), int(completion), int(cost))
            for day, user, key, requests, prompt, completion, cost in rows
        ]

    async def stale_reservations(self, created_before: datetime) -> list[LedgerEntry]:
        sql = (
            "SELECT * FROM ledger WHERE kind IN ('reservation', 'lease') AND created_at < $1"
            " AND NOT EXISTS (SELECT 1 FROM messages WHERE messages.ledger_id = ledger.id"
            " AND messages.status = 'generating') ORDER BY id"
        )
        return await self._read(lambda conn: all_of(conn, LedgerEntry, sql, created_before))

    async def get_ledger_entry(self, entry_id: int) -> LedgerEntry:
        return await self._read(lambda conn: by_id(conn, LedgerEntry, "ledger", entry_id, "ledger entry"))

    async def list_ledger(self, user_id: int, limit: int = 100) -> list[LedgerEntry]:
        sql = "SELECT * FROM ledger WHERE user_id = $1 ORDER BY id DESC LIMIT $2"
        return await self._read(lambda conn: all_of(conn, LedgerEntry, sql, user_id, limit))

    # leases (what makes this a LeaseStore)

    async def charge_lease(self, lease_id: int, charges: list[LedgerDraft], counted_tokens: int) -> int:
        return await self._write(lambda conn: ledger.charge_lease(conn, lease_id, charges, counted_tokens))

    async def release_lease(self, lease_id: int, unused_requests: int, unused_tokens: int) -> LedgerEntry:
        return await self._write(
            lambda conn: ledger.release_lease(conn, lease_id, unused_requests, unused_tokens)
        )

    async def shrink_lease(
        self, lease_id: int, requests: int, unused_requests: int, unused_tokens: int, unused_amount: int
    ) -> None:
        await self._write(
            lambda conn: ledger.shrink_lease(
                conn, lease_id, requests, unused_requests, unused_tokens, unused_amount
            )
        )

    # conversations

    async def create_conversation(
        self, user_id: int, kind: str, name: str = "", series_id: int | None = None
    ) -> Conversation:
        async def create(conn: asyncpg.Connection) -> Conversation:
            await balance_of(conn, user_id)  # NotFound for a missing user
            now = _now()
            values = {"user_id": user_id, "kind": kind, "name": name, "series_id": series_id}
            return record(
                Conversation,
                await insert(conn, "conversations", {**values, "created_at": now, "updated_at": now}),
            )

        return await self._write(create)

    async def get_conversation(self, conversation_id: int) -> Conversation:
        return await self._read(
            lambda conn: by_id(conn, Conversation, "conversations", conversation_id, "conversation")
        )

    async def conversation_since(
        self, conversation_id: int, after_revision: int
    ) -> tuple[Conversation, list[Message]]:
        async def since(conn: asyncpg.Connection) -> tuple[Conversation, list[Message]]:
            conversation = await by_id(conn, Conversation, "conversations", conversation_id, "conversation")
            if conversation.revision <= after_revision:
                return conversation, []
            return conversation, await _messages(conn, conversation_id, after_revision)

        return await self._read(since, snapshot=True)

    async def list_conversations(
        self, user_id: int, kind: str | None = None, series_id: int | None = None
    ) -> list[Conversation]:
        filters = {"user_id": user_id, "kind": kind, "series_id": series_id}
        filters = {column: value for column, value in filters.items() if value is not None}
        where = " AND ".join(f"{column} = ${n}" for n, column in enumerate(filters, start=1))
        sql = f"SELECT * FROM conversations WHERE {where} ORDER BY id"
        return await self._read(lambda conn: all_of(conn, Conversation, sql, *filters.values()))

    async def update_conversation(self, conversation_id: int, patch: ConversationPatch) -> Conversation:
        values = {**assigned(patch), "updated_at": _now()}

        async def change(conn: asyncpg.Connection) -> Conversation:
            row = await update(conn, "conversations", conversation_id, values)
            return record(Conversation, found(row, "conversation", conversation_id))

        return await self._write(change)

    async def delete_conversation(self, conversation_id: int) -> Conversation:
        # Messages go with it through ON DELETE CASCADE.
        sql = "DELETE FROM conversations WHERE id = $1 RETURNING *"
        return await self._write(
            lambda conn: write_one(
                conn, Conversation, sql, (conversation_id,), "conversation", conversation_id
            )
        )

    async def delete_stale_conversations(
        self, kind: str, updated_before: datetime, *, empty_only: bool = False
    ) -> int:
        # One statement; messages go with their conversations through ON DELETE CASCADE.
        sql = "DELETE FROM conversations WHERE kind = $1 AND updated_at < $2"
        if empty_only:
            sql += " AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = conversations.id)"

        async def delete(conn: asyncpg.Connection) -> int:
            status = await conn.execute(sql, kind, updated_before)  # "DELETE <count>"
            return int(status.rsplit(" ", 1)[-1])

        return await self._write(delete)

    # messages

    async def append_message(self, conversation_id: int, draft: MessageDraft) -> Message:
        [message] = await self.append_messages(conversation_id, [draft])
        return message

    async def append_messages(self, conversation_id: int, drafts: list[MessageDraft]) -> list[Message]:
        owner = self._owner()

        async def append(conn: asyncpg.Connection) -> list[Message]:
            # Lock the conversation first, then read the clock: appends to it take their ids
            # and times in one order, whatever process makes them.
            if (
                await conn.fetchval("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", conversation_id)
                is None
            ):
                raise NotFound(f"conversation {conversation_id} not found")
            now = _now()
            await conn.execute("UPDATE conversations SET updated_at = $1 WHERE id = $2", now, conversation_id)
            appended = []
            for draft in drafts:
                values = {**msgspec.structs.asdict(draft), "conversation_id": conversation_id}
                if draft.status == "generating":  # a reply being generated belongs to its process
                    values["owner"] = owner
                row = await insert(conn, "messages", {**values, "created_at": now, "updated_at": now})
                appended.append(record(Message, row))
            return appended

        return await self._write(append)

    async def update_message(self, message_id: int, patch: MessagePatch) -> Message:
        values = {**assigned(patch), "updated_at": _now()}
        if values.get("status") == "generating":  # a reply generated again belongs to this process
            values["owner"] = self._owner()

        async def change(conn: asyncpg.Connection) -> Message:
            return record(
                Message, found(await update(conn, "messages", message_id, values), "message", message_id)
            )

        return await self._write(change)

    async def get_message(self, message_id: int) -> Message:
        return await self._read(lambda conn: by_id(conn, Message, "messages", message_id, "message"))

    async def list_messages(self, conversation_id: int) -> list[Message]:
        return await self._read(lambda conn: _messages(conn, conversation_id, -1))

    async def changed_messages(self, conversation_id: int, after_revision: int) -> list[Message]:
        return await self._read(lambda conn: _messages(conn, conversation_id, after_revision))

    async def interrupt_stale_generations(self, updated_before: datetime) -> list[Message]:
        sql = (
            "UPDATE messages SET status = 'interrupted', updated_at = $1"
            " WHERE status = 'generating' AND updated_at < $2 RETURNING *"
        )
        messages = await self._write(lambda conn: all_of(conn, Message, sql, _now(), updated_before))
        return sorted(messages, key=lambda m: m.id)

    # processes acting as one (what makes this a ClusterStore)

    async def join(self, receiver: Receiver, on_standing: StandingWatcher | None = None) -> str:
        if self._membership is not None:
            raise StoreError("this store instance already joined")
        self._pool_or_fail()
        membership = cluster.Membership(self._connect, self.options.schema, receiver, on_standing)
        try:
            instance = await membership.start()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(f"cannot join the PostgreSQL store: {exc}") from exc
        self._membership = membership
        return instance

    async def signal(self, message: str) -> None:
        membership = self._membership
        if membership is None:
            raise StoreError("join before signalling")
        if len(message.encode()) > MAX_SIGNAL_BYTES:
            raise ValueError(f"a signal is at most {MAX_SIGNAL_BYTES} bytes")
        payload = f"{membership.instance}|{message}"
        await self._read(lambda conn: conn.execute("SELECT pg_notify($1, $2)", membership.channel, payload))

    async def recover(self) -> tuple[list[Message], list[LedgerEntry]]:
        membership = self._membership
        if membership is None:
            raise StoreError("join before recovering")
        replies: list[Message] = []
        entries: list[LedgerEntry] = []
        for instance in await self._read(lambda conn: cluster.dead_instances(conn, membership.space)):
            left = await self._write(functools.partial(cluster.take_over, instance=instance, now=_now()))
            if left is not None:
                replies += left[0]
                entries += left[1]
        return replies, entries

    def standing(self) -> str | None:
        return (
            "this process has not joined the store" if self._membership is None else self._membership.standing
        )

    def instance_id(self) -> str | None:
        return None if self._membership is None else self._membership.instance

    def _owner(self) -> str | None:
        # Read at each write: after losing standing a process joins again under a new id.
        return None if self._membership is None else self._membership.instance

    # copying whole tables (what makes this a CopyableStore)

    async def dump(self, table: str) -> AsyncIterator[list[dict[str, Any]]]:
        after: tuple[Any, ...] | None = None
        while rows := await self._read(functools.partial(copying.dump_batch, table=table, after=after)):
            yield rows
            after = tuple(rows[-1][column] for column in copying.key_of(table))

    async def load(self, table: str, rows: list[dict[str, Any]]) -> None:
        await self._write(functools.partial(copying.load, table=table, rows=rows))

    async def is_empty(self) -> bool:
        return await self._read(copying.is_empty, snapshot=True)

    async def last_ids(self) -> dict[str, int]:
        return await self._read(copying.last_ids, snapshot=True)

    async def after_load(self, last_ids: Mapping[str, int]) -> None:
        await self._write(functools.partial(copying.after_load, last=last_ids))

    async def totals(self) -> StoreTotals:
        return await self._read(copying.totals, snapshot=True)

    # plumbing

    def _pool_or_fail(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError(f"postgres store {self.instance!r} is not open")
        return self._pool

    async def _read(
        self, call: Callable[[asyncpg.Connection], Awaitable[_T]], *, snapshot: bool = False
    ) -> _T:
        """``call(connection)``; with ``snapshot``, every statement of it sees one moment."""
        async with self._pool_or_fail().acquire() as conn:
            if not snapshot:
                return await call(conn)
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                return await call(conn)

    async def _write(self, call: Callable[[asyncpg.Connection], Awaitable[_T]]) -> _T:
        """``call(connection)`` in one transaction, retried whole if it loses a deadlock.

        Shielded: a caller cancelled meanwhile gets CancelledError, the write goes on.
        """
        task = asyncio.ensure_future(self._transact(call))
        task.add_done_callback(_observed)
        return await asyncio.shield(task)

    async def _transact(self, call: Callable[[asyncpg.Connection], Awaitable[_T]]) -> _T:
        pool = self._pool_or_fail()
        for attempt in range(_TRIES):
            try:
                async with pool.acquire() as conn, conn.transaction():
                    return await call(conn)
            except _RETRIED:
                if attempt == _TRIES - 1:
                    raise
                await asyncio.sleep(0.001 * 2**attempt)
        raise AssertionError("unreachable")


async def _messages(conn: asyncpg.Connection, conversation_id: int, after_revision: int) -> list[Message]:
    sql = "SELECT * FROM messages WHERE conversation_id = $1 AND revision > $2 ORDER BY id"
    return await all_of(conn, Message, sql, conversation_id, after_revision)


def _now() -> datetime:
    return ledger.moment(ledger.now_ms())


async def _keep(conn: asyncpg.Connection) -> None:
    """The pool's reset: nothing to undo."""


def _observed(task: asyncio.Future[Any]) -> None:
    # A shielded write whose caller left: nobody else would see it fail.
    if not task.cancelled() and (error := task.exception()) is not None:
        log.debug("a store write failed after its caller left: %s: %s", type(error).__name__, error)
