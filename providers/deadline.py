"""A deadline for the reads of one streamed reply, at the cost of one timer per reply.

``asyncio.timeout`` around every read would schedule and cancel a timer per
chunk, and a streamed reply is one chunk per token: that alone cost more than
parsing the chunk. It also cannot stay open across the ``yield`` of an async
generator, since it would then cancel whatever the consumer awaits. This
keeps one timer that re-arms itself lazily and cancels the task only while it
is inside :meth:`ReadDeadline.read`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")


class DeadlineExceeded(Exception):
    """A read was still waiting when its deadline passed."""


class ReadDeadline:
    """Bounds each :meth:`read` by a deadline that :meth:`move` can push back cheaply.

    Promises: a read waiting past the deadline raises :class:`DeadlineExceeded`
    (the waiting task is cancelled and uncancelled, like ``asyncio.timeout``
    does), and so does a read started after it; an outside cancellation
    still raises ``CancelledError``; :meth:`close` releases the timer.
    """

    __slots__ = ("_expired", "_handle", "_loop", "_task", "when")

    def __init__(self, when: float) -> None:
        self._loop = asyncio.get_running_loop()
        self.when = when
        self._task: asyncio.Task[object] | None = None
        self._expired = False
        self._handle: asyncio.TimerHandle | None = self._loop.call_at(when, self._check)

    def move(self, when: float) -> None:
        """Set a new deadline; a later one is free (the timer re-arms itself when it fires)."""
        if self._handle is None or when < self.when:
            if self._handle is not None:
                self._handle.cancel()
            self._handle = self._loop.call_at(when, self._check)
        self.when = when

    def extend(self, seconds: float, limit: float) -> None:
        """Move the deadline to ``seconds`` from now, but not past ``limit``."""
        self.move(min(self._loop.time() + seconds, limit))

    async def read(self, chunks: AsyncIterator[T]) -> T | None:
        """The next item of ``chunks`` (None at its end), if it arrives before the deadline."""
        if self._handle is None and self._loop.time() >= self.when:
            raise DeadlineExceeded
        task = self._task = asyncio.current_task()
        # Like asyncio.timeout: only a cancellation beyond those already pending is ours.
        pending = task.cancelling() if task is not None else 0
        try:
            return await anext(chunks, None)
        except asyncio.CancelledError:
            if self._expired and task is not None:
                self._expired = False
                if task.uncancel() <= pending:
                    raise DeadlineExceeded from None
            raise
        finally:
            self._task = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        now = self._loop.time()
        if now < self.when:  # moved later since armed
            self._handle = self._loop.call_at(self.when, self._check)
        else:
            self._handle = None  # a read started from now on fails at once, unless moved
            if self._task is not None:
                self._expired = True
                self._task.cancel()
