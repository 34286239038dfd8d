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
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from core import LedgerEntry, Message, Receiver

from .rows import all_of

log = logging.getLogger("chatgate.store.postgres")

BEAT = 1.0
"""Seconds between checks that the server still answers on the membership connection."""

CHECK_TIMEOUT = 2.0
"""How long a check may take before the connection counts as lost. Not shorter: liveness is
the lock the session holds, and a busy server answering late still holds it (a hiccup must
not hand this process's work to the others for nothing). Not longer: with :data:`BEAT`, this
process notices a partition (about 3 s) before the server ends its session and so frees its
lock for the others (about 5 s: :data:`KEEPALIVE`), never after."""

QUARANTINE = 3.0
"""Seconds a process that lost its standing waits before joining again: by then its replies
are stopped and its leases retired, and the others have had a look for what it left."""

KEEPALIVE = {
    # The server drops the session of a host that vanished (no FIN: a crash, a partition)
    # within about five seconds instead of TCP's default two hours, releasing its lock.
    "tcp_keepalives_idle": "2",
    "tcp_keepalives_interval": "1",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "5000",
    # The heartbeat's timestamp is for the operator's eye: it need not wait for a disk.
    "synchronous_commit": "off",
}
"""Settings of the membership session (see :meth:`Membership._join`)."""

_FAILURES = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class Membership:
    """This process's place among those serving from one schema: its lock, its channel, its checks.

    ``on_standing`` is called (in the event loop) with the reason the moment the process loses
    its standing, and with None once it joined again (``instance`` is then its new id).
    """

    def __init__(
        self,
        connect: Callable[[dict[str, str]], Awaitable[asyncpg.Connection]],
        schema: str,
        receiver: Receiver,
        on_standing: Callable[[str | None], None] | None = None,
    ) -> None:
        self._connect = connect  # a connection outside the pool, with these extra settings
        self.schema = schema
        self.channel = f"chatgate_{schema}"[:63]
        self._receiver = receiver
        self._on_standing = on_standing
        self._conn: asyncpg.Connection | None = None
        self.instance: str | None = None
        self.space = 0  # the schema's advisory lock space (the first key of the two-key lock)
        self.standing: str | None = "not joined yet"
        self._lost_at = 0.0
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
        conn = await self._connect(KEEPALIVE)
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
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()
        if self.standing is None:
            log.error("out of standing: %s; admitting nothing until it joins again", why)
            self.standing = why
            self._lost_at = time.monotonic()
            if self._on_standing is not None:
                self._on_standing(why)  # at once: replies stop and leases retire before anyone recovers

    async def _watching(self) -> None:
        while True:
            await asyncio.sleep(BEAT)
            try:
                await self._beat()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watch must outlive anything: it is what rejoins
                log.exception("the membership watch failed; trying again")

    async def _beat(self) -> None:
        conn = self._conn
        if conn is not None:
            try:
                await conn.execute(
                    "UPDATE instances SET heartbeat_at = now() WHERE id = $1",
                    int(self.instance or 0),
                    timeout=CHECK_TIMEOUT,
                )
                return
            except _FAILURES as exc:
                self._lose(f"PostgreSQL did not answer the membership check ({type(exc).__name__})")
        if time.monotonic() - self._lost_at < QUARANTINE:
            return
        try:
            await self._join()
        except _FAILURES as exc:
            log.warning("cannot join the store again yet: %s: %s", type(exc).__name__, exc)
            return
        log.warning("joined the store again as instance %s; admitting again", self.instance)
        if self._on_standing is not None:
            self._on_standing(None)


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
