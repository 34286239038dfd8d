"""Processes sharing one PostgreSQL schema as one server (:class:`core.cluster.ClusterStore`).

Each process keeps one connection of its own, outside the pool (asyncpg's pool
runs ``pg_advisory_unlock_all()`` and ``UNLISTEN *`` on every connection it takes
back). On it the process:

- holds a session advisory lock named for its instance id: PostgreSQL releases
  it the moment the session ends, ``kill -9`` of the process included (the
  kernel closes the socket), so "alive" means "its lock is held", read from
  ``pg_locks``, with no clock and no expiry to wait out;
- LISTENs on the schema's channel: a signal is one ``pg_notify`` (p99 3.5 ms
  from commit to the listener, research/scale-out.md [M5]);
- checks every second that the server still answers. When the connection
  breaks or a check fails, the lock is (or soon will be) gone and the others
  will take over what this process owns: it is out of standing at once, and
  joins again, under a new id, as soon as the server answers.

Never run this connection through PgBouncer in transaction mode: neither
LISTEN nor session locks survive it (docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

import asyncpg

from core import LedgerEntry, Message, Receiver

from .rows import all_of

log = logging.getLogger("chatgate.store.postgres")

BEAT = 1.0
"""Seconds between checks that the server still answers on the membership connection."""


class Membership:
    """This process's place among those serving from one schema: its lock, its channel, its checks."""

    def __init__(self, connect: Any, schema: str, receiver: Receiver) -> None:
        self._connect = connect  # () -> Awaitable[asyncpg.Connection], outside the pool
        self.schema = schema
        self.channel = f"chatgate_{schema}"[:63]
        self._receiver = receiver
        self._conn: asyncpg.Connection | None = None
        self.instance: str | None = None
        self.space = 0  # the schema's advisory lock space (the first key of the two-key lock)
        self.standing: str | None = "not joined yet"
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> str:
        """Join (raises when the server cannot be reached) and keep watching the connection."""
        await self._join()
        self._watch = asyncio.create_task(self._watching(), name="chatgate-postgres-membership")
        assert self.instance is not None
        return self.instance

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                # Leaving: what it owned ended with its replies and leases (the services close first).
                await conn.execute("DELETE FROM instances WHERE id = $1", int(self.instance or 0), timeout=2)
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)
        self.standing = "left"

    async def _join(self) -> None:
        conn = await self._connect()
        try:
            self.space = await conn.fetchval(
                "SELECT hashtext($1) & 2147483647", f"chatgate.instances:{self.schema}"
            )
            number = await conn.fetchval("SELECT nextval('instances_id')")
            # Locked before it is listed: a peer never finds a listed instance that was never alive.
            await conn.execute("SELECT pg_advisory_lock($1, $2)", self.space, number)
            await conn.add_listener(self.channel, self._notified)
            await conn.execute(
                "INSERT INTO instances (id, pid, host) VALUES ($1, $2, $3)",
                number,
                os.getpid(),
                socket.gethostname(),
            )
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._terminated)
        self._conn = conn
        self.instance = str(number)
        self.standing = None

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        sender, _, message = payload.partition("|")
        if sender != self.instance:
            self._receiver(message)

    def _terminated(self, conn: Any) -> None:
        if conn is self._conn:
            self._lose("the connection that proves this process alive to PostgreSQL closed")

    def _lose(self, why: str) -> None:
        if self.standing is None:
            log.error("out of standing: %s; admitting nothing until it is back", why)
            self.standing = why
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def _watching(self) -> None:
        while True:
            await asyncio.sleep(BEAT)
            conn = self._conn
            if conn is not None:
                try:
                    await conn.execute(
                        "UPDATE instances SET heartbeat_at = now() WHERE id = $1",
                        int(self.instance or 0),
                        timeout=BEAT,
                    )
                    continue
                except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    self._lose(f"PostgreSQL did not answer the membership check ({type(exc).__name__})")
            try:
                await self._join()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("cannot join the store again yet: %s: %s", type(exc).__name__, exc)
                continue
            log.warning("joined the store again as instance %s; admitting again", self.instance)


async def dead_instances(conn: asyncpg.Connection, space: int) -> list[int]:
    """Listed instances whose lock nobody holds: their process is gone."""
    rows = await conn.fetch(
        "SELECT i.id FROM instances i WHERE NOT EXISTS (SELECT 1 FROM pg_locks l"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND l.classid = $1::bigint::oid AND l.objid = i.id::bigint::oid) ORDER BY i.id",
        space,
    )
    return [row["id"] for row in rows]


async def take_over(
    conn: asyncpg.Connection, instance: int, now: Any
) -> tuple[list[Message], list[LedgerEntry]] | None:
    """What dead ``instance`` left (None when another process took it over first)."""
    if await conn.fetchval("DELETE FROM instances WHERE id = $1 RETURNING id", instance) is None:
        return None
    owner = str(instance)
    replies = await all_of(
        conn,
        Message,
        "UPDATE messages SET status = 'interrupted', updated_at = $1"
        " WHERE owner = $2 AND status = 'generating' RETURNING *",
        now,
        owner,
    )
    entries = await all_of(
        conn,
        LedgerEntry,
        "SELECT * FROM ledger WHERE owner = $1 AND kind IN ('reservation', 'lease')"
        " AND NOT EXISTS (SELECT 1 FROM messages WHERE messages.ledger_id = ledger.id) ORDER BY id",
        owner,
    )
    return replies, entries
