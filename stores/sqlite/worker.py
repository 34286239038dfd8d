"""The thread that owns a SQLite connection, with group commit.

Every store call is a plain function of the connection, run on this thread.
Calls that queue up while the thread is busy run together in one
transaction, each inside a savepoint of its own: one commit (one set of file
locks, one write of each touched page) and one wake-up of the event loop
serve the whole group, which is what keeps SQLite off the critical path at
high concurrency. At concurrency 1 a group is one call, and its transaction
is its own: no savepoint (two statements fewer per call). A group that writes
first takes its turn on the lock file that chatgate's processes queue on
(:mod:`.write_lock`), so SQLite's write lock is free when it asks for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from .write_lock import WriteLock

log = logging.getLogger("chatgate.stores.sqlite")

Mode = Literal["read", "write", "alone"]
"""How a call runs: ``read`` and ``write`` calls are grouped (a group with a write
takes the write lock at once: ``BEGIN IMMEDIATE``); an ``alone`` call runs by
itself outside any transaction (opening, migrating, closing)."""

MAX_GROUP = 128
"""The most calls in one transaction, so a long queue does not hold the write lock long."""


class _Call(NamedTuple):
    function: Callable[..., Any]
    args: tuple[Any, ...]
    mode: Mode
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


_STOP = None


class SqliteWorker:
    """Runs functions of one connection on one thread, in the order they were submitted.

    Promises: each ``read`` or ``write`` call is atomic (what it wrote is rolled
    back if it raises, without touching the other calls of its group) and its
    result is delivered only once its group has committed; if the commit fails,
    every call of the group fails with that error and none of them landed. A
    call whose caller was cancelled before the thread took it up is skipped.
    """

    def __init__(self, name: str = "chatgate-sqlite") -> None:
        self.db: sqlite3.Connection | None = None
        self.write_lock: WriteLock | None = None  # taken by each group that writes, when set
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    async def run(self, mode: Mode, function: Callable[..., Any], *args: Any) -> Any:
        """``function(connection, *args)`` on the thread (``alone`` calls get the worker instead)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put(_Call(function, args, mode, future, loop))
        return await future

    async def stop(self) -> None:
        """Finish the calls already queued, then end the thread."""
        self._queue.put(_STOP)
        # The thread is a daemon: it never keeps the process alive, but a clean close waits for it.
        await asyncio.to_thread(self._thread.join)

    # --- on the thread ---

    def _main(self) -> None:
        waiting: deque[_Call | None] = deque()  # taken from the queue, not yet run
        while True:
            call = waiting.popleft() if waiting else self._queue.get()
            if call is _STOP:
                return
            if call.mode == "alone":
                self._deliver([self._alone(call)])
                continue
            group = [call]
            while len(group) < MAX_GROUP:
                try:
                    following = self._queue.get_nowait()
                except queue.Empty:
                    break
                if following is _STOP or following.mode == "alone":
                    waiting.append(following)
                    break
                group.append(following)
            self._deliver(self._group(group))

    def _alone(self, call: _Call) -> tuple[_Call, Any, BaseException | None]:
        try:
            return call, call.function(self, *call.args), None
        except BaseException as exc:  # delivered to the caller, who raises it
            return call, None, exc

    def _group(self, group: list[_Call]) -> list[tuple[_Call, Any, BaseException | None]]:
        db = self.db
        group = [call for call in group if not call.future.done()]  # callers cancelled meanwhile
        if not group:
            return []
        if db is None:
            error = sqlite3.ProgrammingError("the store is closed")
            return [(call, None, error) for call in group]
        writes = any(c.mode == "write" for c in group)
        lock = self.write_lock if writes else None
        if lock is None:
            return self._transaction(db, group, "BEGIN IMMEDIATE" if writes else "BEGIN")
        try:
            lock.acquire()
        except OSError as exc:
            return [(call, None, exc) for call in group]
        try:
            return self._transaction(db, group, "BEGIN IMMEDIATE")
        finally:
            lock.release()  # once the group's transaction has ended, before any answer

    def _transaction(
        self, db: sqlite3.Connection, group: list[_Call], begin: str
    ) -> list[tuple[_Call, Any, BaseException | None]]:
        outcomes: list[tuple[_Call, Any, BaseException | None]] = []
        try:
            db.execute(begin)
        except sqlite3.Error as exc:
            return [(call, None, exc) for call in group]
        if len(group) == 1:  # the transaction is the call's own: no savepoint needed
            return [self._single(db, group[0])]
        try:
            for call in group:
                db.execute("SAVEPOINT call")
                try:
                    result = call.function(db, *call.args)
                except Exception as exc:
                    db.execute("ROLLBACK TO call")
                    outcomes.append((call, None, exc))
                else:
                    outcomes.append((call, result, None))
                db.execute("RELEASE call")
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                db.rollback()
            log.error("a SQLite transaction of %d calls failed and was rolled back: %s", len(group), exc)
            return [(call, None, exc) for call in group]
        return outcomes

    @staticmethod
    def _single(db: sqlite3.Connection, call: _Call) -> tuple[_Call, Any, BaseException | None]:
        try:
            result = call.function(db, *call.args)
        except BaseException as exc:  # the call's own failure (a refusal, a missing row): nothing landed
            db.rollback()
            return call, None, exc
        try:
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                db.rollback()
            log.error("a SQLite transaction failed and was rolled back: %s", exc)
            return call, None, exc
        return call, result, None

    @staticmethod
    def _deliver(outcomes: list[tuple[_Call, Any, BaseException | None]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Call, Any, BaseException | None]]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[0].loop, []).append(outcome)
        for loop, mine in by_loop.items():
            # One wake-up per group; a closed loop has nobody waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, mine)


def _settle(outcomes: list[tuple[_Call, Any, BaseException | None]]) -> None:
    for call, result, error in outcomes:
        if call.future.done():
            continue
        if error is not None:
            call.future.set_exception(error)
        else:
            call.future.set_result(result)
