"""The queue chatgate's processes form for SQLite's write lock: a lock on a file beside the database.

SQLite has no queue for its write lock. A connection that finds it taken
polls, sleeping longer after each miss (up to 100 ms), and gives up with
``database is locked`` after ``busy_timeout``. Under steady writes from
several worker processes the one that has waited longest looks least often,
while the others take the lock back within microseconds of releasing it: on
16 cores 8 workers logged ``database is locked`` (writes that waited 5 s), and
on 2 cores 8 processes writing flat out saw writes wait up to 1.7 s (at most
0.14 s with this lock, at the same throughput).

So every chatgate connection takes this lock (``flock`` on ``<database>-lock``)
before it asks SQLite for the write lock, and holds it until its transaction
has ended; opening and closing, which may switch the journal mode, migrate or
checkpoint, take it too. A waiter sleeps in the kernel and is woken when the
lock is released, and SQLite's own lock is then free when it asks. Nothing
depends on the lock for correctness: SQLite still locks as before, so a
process that does not take it (the ``sqlite3`` shell, an older chatgate)
is merely not queued, and waits out ``busy_timeout`` as before.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: SQLite's own locking alone
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("chatgate.stores.sqlite")

UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}
"""What ``flock`` fails with on a file system that has no such locks: SQLite's own locking then."""


class WriteLock:
    """An exclusive lock on ``path`` (created if missing, never deleted), held by one
    connection of one process at a time; a waiter blocks until it is free.

    Each instance has a file description of its own, so two instances, in one process
    or two, exclude each other; an instance must be used by one thread at a time.
    Closing it (or the process ending, however) releases it. A waiter has no time
    limit: a holder holds it for one transaction, whose wait for SQLite's lock is
    itself bounded by ``busy_timeout``, so it waits for the transactions queued
    before it; but a process stopped while holding it (a debugger, ``kill -STOP``)
    holds every write back until it goes on or ends. On a file system without
    ``flock`` it locks nothing, once it has logged so.
    """

    def __init__(self, path: Path) -> None:
        # Deleted, a new file would not exclude holders of the old one: it is left in place.
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited (PEP 446)

    def acquire(self) -> None:
        """Wait until this is the holder (OSError: the kernel could not lock)."""
        if fcntl is not None and self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except OSError as exc:
                if exc.errno not in UNSUPPORTED:
                    raise
                log.warning(
                    "no flock on %s (%s): writers are not queued, SQLite's busy_timeout applies",
                    self.path,
                    exc,
                )
                self.close()

    def release(self) -> None:
        if fcntl is not None and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
