"""Processes sharing one SQLite file as one server (:class:`core.cluster.ClusterStore`).

Every process of one SQLite file runs on one host, which is what makes these
enough:

- **Liveness**: each process that joins holds an ``flock`` on a file of its own,
  ``<database>-instances/<id>``; the kernel releases it the moment the process
  dies (``kill -9`` included), so a peer that can take the lock knows the process
  is gone. (A lock, not a socket name: containers sharing the file but not a
  network namespace, or seeing it under other paths, still see each other.)
- **Signals**: each binds a Unix datagram socket in Linux's abstract namespace,
  named for the database file and its instance id; a signal is one datagram to
  each peer's socket, delivered in about 0.1 ms (research/scale-out.md [M8]),
  with no polling and no write to the file.

The ``instances`` table lists who joined, so a peer knows whom to signal and whom
to check.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import socket
import sqlite3
from pathlib import Path

from core import LedgerEntry, Message, Receiver

from .conversations import message
from .rows import all_of, fetch

_MAX_DATAGRAM = 8192


def address(path: Path, instance: str) -> str:
    """The abstract socket name of ``instance`` of the database at ``path``."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:20]
    return f"\0chatgate-{digest}-{instance}"


def presence_file(path: Path, instance: str) -> Path:
    return path.with_name(path.name + "-instances") / instance


class Presence:
    """The lock that tells the others this process (as ``instance``) is alive, held until
    :meth:`close` or the process's end."""

    def __init__(self, path: Path, instance: str) -> None:
        self.file = presence_file(path, instance)
        self.file.parent.mkdir(exist_ok=True)
        # Readable by all: processes of other users sharing the file must be able to look.
        self._fd: int | None = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new name: nobody holds it
        except BaseException:
            self.close()
            raise

    def close(self, *, leave: bool = True) -> None:
        """Release the lock (``leave``: and remove the file, as nobody needs to take over)."""
        if self._fd is not None:
            if leave:
                self.file.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def alive(path: Path, instance: str) -> bool:
    """Whether the process that joined as ``instance`` still runs (it holds its lock)."""
    try:
        fd = os.open(presence_file(path, instance), os.O_RDONLY)  # flock needs no write access
    except FileNotFoundError:
        return False  # it left, or a peer that took its leftovers over removed the file
    except PermissionError:
        return True  # cannot tell: never take over what may be alive
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock if it was taken
    return False


def forget(path: Path, instance: str) -> None:
    """Remove a dead instance's lock file (after its leftovers were taken over)."""
    presence_file(path, instance).unlink(missing_ok=True)


class Mailbox:
    """This process's socket: bound for as long as it lives, handing each datagram to ``receiver``."""

    def __init__(self, path: Path, instance: str, receiver: Receiver) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.bind(address(path, instance))
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise
        self._receiver = receiver
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._drain)

    def _drain(self) -> None:
        while True:
            try:
                data = self._sock.recv(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            if data:
                self._receiver(data.decode("utf-8", "replace"))

    def send(self, instance: str, message: str) -> bool:
        """Send ``message`` to ``instance``; False when it is gone (or its mailbox is full)."""
        try:
            self._sock.sendto(message.encode(), address(self.path, instance))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except BlockingIOError:  # a peer too busy to read: best effort
            return True
        return True

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


# --- calls that run on the store's thread ---


def register(db: sqlite3.Connection, instance: str, started_at: int) -> None:
    db.execute(
        "INSERT INTO instances (id, pid, host, started_at) VALUES (?, ?, ?, ?)",
        (instance, os.getpid(), socket.gethostname(), started_at),
    )


def leave(db: sqlite3.Connection, instance: str) -> None:
    db.execute("DELETE FROM instances WHERE id = ?", (instance,))


def members(db: sqlite3.Connection) -> list[str]:
    return [row["id"] for row in fetch(db, "SELECT id FROM instances ORDER BY started_at")]


def take_over(
    db: sqlite3.Connection, instance: str, now: int
) -> tuple[list[Message], list[LedgerEntry]] | None:
    """What dead ``instance`` left (None when another process took it over first)."""
    if not fetch(db, "DELETE FROM instances WHERE id = ? RETURNING id", (instance,)):
        return None
    interrupted = fetch(
        db,
        "UPDATE messages SET status = 'interrupted', updated_at = ?"
        " WHERE owner = ? AND status = 'generating' RETURNING id",
        (now, instance),
    )
    replies = [message(db, row["id"]) for row in interrupted]
    entries = all_of(
        db,
        LedgerEntry,
        "SELECT * FROM ledger WHERE owner = ? AND kind IN ('reservation', 'lease')"
        " AND NOT EXISTS (SELECT 1 FROM messages WHERE messages.ledger_id = ledger.id) ORDER BY id",
        (instance,),
    )
    return replies, entries
