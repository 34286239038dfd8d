"""The periodic deletion of stored responses past their retention, and of the empty
conversations of replies whose process died while they ran.

A response's conversation is made empty when its reply starts and gets both its
messages at once (one atomic append) when the reply ends, or is deleted when it is
refused or abandoned. So a ``response`` conversation without messages is a reply still
running or one whose process died before it ended; no reply runs for
:data:`SLOT_LIFETIME`, so an empty one older than that was left by a dead process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from core import Store, utcnow

from .saved import KIND

log = logging.getLogger("chatgate.openai_compat.responses")

SWEEP_EVERY = 300.0
"""Seconds between sweeps (the first runs when the surface opens)."""
SLOT_LIFETIME = timedelta(days=1)
"""How old an empty response conversation must be to be deleted: far longer than any reply runs."""


class Sweeper:
    """Deletes expired stored responses and the empty slots dead processes left.

    Promises: :meth:`start` sweeps at once and then every ``every`` seconds until
    :meth:`aclose`; a sweep that fails is logged and the next one runs as planned (the
    task never ends on an error); with no ``retention``, stored responses are kept for
    ever and only empty slots are deleted.
    """

    def __init__(self, store: Store, retention: timedelta | None, every: float = SWEEP_EVERY) -> None:
        self.store = store
        self.retention = retention
        self.every = every
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="chatgate-responses-sweep")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def sweep(self) -> int:
        """One sweep; how many conversations it deleted."""
        now = utcnow()
        deleted = await self.store.delete_stale_conversations(KIND, now - SLOT_LIFETIME, empty_only=True)
        if self.retention is not None:
            deleted += await self.store.delete_stale_conversations(KIND, now - self.retention)
        return deleted

    async def _run(self) -> None:
        while True:
            try:
                if deleted := await self.sweep():
                    log.info("deleted %d stored responses past their retention or left unfinished", deleted)
            except Exception:
                log.exception("could not sweep stored responses; trying again in %g s", self.every)
            await asyncio.sleep(self.every)
