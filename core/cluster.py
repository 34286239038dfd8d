"""Many processes on one store acting as one server: liveness, ownership and signals.

:class:`ClusterStore` is an optional capability of a store, like
:class:`~core.store.LeaseStore`. With it, every process that serves from the
store joins it at start-up (:meth:`ClusterStore.join`) and from then on:

- **is known alive** to the others for as long as it runs, by something that
  dies with it (a lock its database session holds, a lock on a file), never by
  a timestamp alone, so a ``kill -9`` is noticed at once;
- **owns** the reservations, leases and replies being generated that it writes,
  so whoever finds it dead takes over exactly those (:meth:`ClusterStore.recover`):
  its replies are marked ``interrupted`` with the text they had persisted, and
  its reservations and leases are settled, freeing their concurrency slots;
- **hears signals**: a short message one process sends reaches every other
  joined process within milliseconds (best effort; a newer request that
  interrupts another process's reply is the one user, and a running reply
  that finds a newer message at its next flush stops by itself, which covers
  a lost one).

A process that can no longer prove it is alive to the others (its connection
to the store broke) is *out of standing* (:meth:`ClusterStore.standing`): the
others will soon take over what it owns, so it stops admitting (fail closed),
interrupts its own replies and retires its leases, and joins again as a new
instance a few seconds after it can.

With a store that is not a ClusterStore everything still works inside one
process; replies a crashed process left are found by their age instead
(``[generation] stale_after``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable

from .records import LedgerEntry, Message
from .store import Store

Receiver = Callable[[str], None]
"""Called in the event loop with each signal another process sent."""

StandingWatcher = Callable[[str | None], None]
"""Called in the event loop with the reason the moment this process loses its standing, and
with None once it has joined again (under a new instance id)."""

MAX_SIGNAL_BYTES = 4000
"""The longest signal every cluster store carries (PostgreSQL's NOTIFY allows 8,000 bytes)."""


class ClusterStore(Store):
    """A store that several processes (workers, instances) share as one server.

    Every cluster store passes :class:`core.testing.cluster_suite.ClusterConformance`.
    """

    @abc.abstractmethod
    async def join(self, receiver: Receiver, on_standing: StandingWatcher | None = None) -> str:
        """Register this process and return its instance id (unique, never reused).

        From this call on, until :meth:`~core.plugin.Plugin.aclose` or the process
        dies, other processes see it alive; each signal another process sends is
        passed to ``receiver``; and the reservations and leases this store instance
        posts, and the messages it writes with status ``generating``, are owned by
        this instance. A store that can lose its standing while the process lives
        tells ``on_standing`` at once (the caller then stops what it runs: the others
        will take it over), waits a moment, and joins again under a new id; what the
        old one owned is recovered like a dead instance's.
        """

    @abc.abstractmethod
    async def signal(self, message: str) -> None:
        """Send ``message`` (at most :data:`MAX_SIGNAL_BYTES` bytes of UTF-8) to every other
        joined process. Best effort: a process that is not listening just now misses it."""

    @abc.abstractmethod
    async def recover(self) -> tuple[list[Message], list[LedgerEntry]]:
        """Take over what instances that are no longer alive left, atomically per instance.

        Marks their ``generating`` messages ``interrupted`` (text as last written) and
        returns them, so their reservations can be settled; returns their
        reservations and leases still open that no message holds, to be settled;
        then forgets those instances. Safe to call from many processes at once:
        each dead instance's leftovers are returned to one caller only.
        """

    @abc.abstractmethod
    def instance_id(self) -> str | None:
        """This process's instance id now (it changes when it joins again), or None before joining."""

    @abc.abstractmethod
    def standing(self) -> str | None:
        """None while this process is joined and provably alive to the others; otherwise
        why not (for the log and ``/healthz``). Cheap: called on every admission."""
