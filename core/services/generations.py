"""Running replies as cancellable tasks that persist their progress.

One :class:`Generation` per reply being produced. It consumes a provider
stream in its own task, so a reply outlives the HTTP request that started
it; keeps the partial reply in memory for live followers; and is written to
the store by the runner's ticker at most every ``flush_interval`` seconds
(and at least every ``stale_after / 3`` seconds, a heartbeat that tells
other processes it is alive), then once more when it ends: ``complete``,
``interrupted`` (cancelled) or ``error`` (the provider failed). A reply that
passes the output tokens reserved for it (an upstream that ignores
``max_tokens``) is cut there and completes as ``length``. Reading, cutting,
classifying and settling are :class:`~core.reply.ReplyRun`'s, shared with the
stateless completions; a generation adds its followers, its store writes and its
stored message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

from ..cluster import ClusterStore
from ..errors import ProviderError
from ..locks import KeyedLock
from ..records import Message, MessagePatch, MessageStatus, utcnow
from ..reply import End, ReplyRun
from ..store import Store
from ..types import ChatRequest, ProviderEvent, ToolCallDelta, Usage
from .billing import Billing, Reservation
from .catalog import Route

STALE_RESERVATION = timedelta(hours=1)
"""A reservation older than this, held by no reply, outlived any request (total_timeout is 15 min)."""

RECOVER_EVERY = 1.0
"""Seconds between looks for processes that died (with a cluster store): what they left is taken over."""

HANDOVER_TIMEOUT = 2.0
"""How long a newer request waits for another process to stop and persist the reply it interrupts
(a process that died meanwhile is found by the next look for dead ones)."""

log = logging.getLogger("chatgate.generations")


@dataclass(frozen=True)
class Outcome:
    """How a generation ended."""

    status: MessageStatus
    message: Message
    usage: Usage
    finish_reason: str | None
    error: ProviderError | None
    tool_calls: tuple[ToolCallDelta, ...]


STATUS: dict[End, MessageStatus] = {"complete": "complete", "cancelled": "interrupted", "error": "error"}
"""The stored status of a reply that ended so."""


class Generation(ReplyRun):
    """A reply being produced for one conversation. Read it; do not mutate it.

    The reply so far is :attr:`content`, :attr:`reasoning`, :attr:`tool_calls` and
    :attr:`finish`; :attr:`events` every event from the start.
    """

    outcomes: ClassVar[Mapping[End, str]] = {"complete": "ok", "cancelled": "interrupted", "error": "error"}
    log = log

    def __init__(
        self,
        conversation_id: int,
        message_id: int,
        route: Route,
        request: ChatRequest,
        reservation: Reservation | None,
        question_id: int | None = None,
        *,
        billing: Billing,
        started: float,
    ) -> None:
        super().__init__(billing, route, request, reservation, started)
        self.conversation_id = conversation_id
        self.message_id = message_id
        self.question_id = question_id
        """The user message this reply answers, when the caller said."""
        self.events: list[ProviderEvent] = []
        self.done = False
        self.task: asyncio.Task[None] | None = None
        self._begun = asyncio.Event()  # set once the task began: an interrupt waits for it
        self._waiting: list[asyncio.Future[None]] = []
        self._outcome: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._write_lock = asyncio.Lock()
        self._dirty = False
        self._written_at = time.monotonic()
        self._revision = 0  # the conversation's revision at this reply's last flush (0: none yet)
        self._newest = message_id  # the conversation's last message when the reply started
        self._taken = False  # another process restarted this very message: leave it to that one

    async def follow(self, pace: float = 0.0) -> AsyncIterator[ProviderEvent]:
        """Every event of this generation from its start, then live until it ends (``pace``: as
        in :meth:`batches`)."""
        async for batch in self.batches(pace):
            for event in batch:
                yield event

    async def batches(self, pace: float = 0.0) -> AsyncIterator[list[ProviderEvent]]:
        """The same events, each batch all that arrived since the previous one, so a
        follower that falls behind catches up in one write instead of one per token.

        With ``pace``, a batch follows the previous one ``pace`` seconds later at the
        earliest (the first comes at once): a reader then gets fewer, larger writes when
        tokens come faster than it could see them.
        """
        seen = 0
        while True:
            if seen < len(self.events):
                batch = self.events[seen:]
                seen += len(batch)
                yield batch
                if pace and not self.done:
                    await asyncio.sleep(pace)
                continue
            if self.done:
                return
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            await waiter

    async def wait(self) -> Outcome:
        """Wait for the end. Cancelling the waiter does not cancel the generation."""
        return await asyncio.shield(self._outcome)

    def _publish(self, event: ProviderEvent) -> None:
        self.events.append(event)
        self._dirty = True
        if self._waiting:
            self._wake()

    def _wake(self) -> None:
        # Per token, only when someone follows (an Event per token cost more).
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if not waiter.done():  # a follower cancelled meanwhile
                waiter.set_result(None)


class Upstream:
    """A provider's reply stream whose request is already on its way.

    The first step of the stream (connecting and sending the request, then
    waiting for the first event) runs in a task of its own from the moment
    this is made, so the caller can store the question and the reply while
    the upstream thinks; the generation then takes the stream over.

    Promises: :meth:`events` yields the stream's events from the first;
    cancelling its consumer cancels the pending first step too (so the
    upstream sees the request go); :meth:`aclose` ends the stream, whatever
    state it is in.
    """

    def __init__(self, route: Route, request: ChatRequest) -> None:
        self.started = time.monotonic()
        self._stream = route.stream(request)
        self._first: asyncio.Future[ProviderEvent | None] = asyncio.ensure_future(anext(self._stream, None))

    async def events(self) -> AsyncIterator[ProviderEvent]:
        first = await self._first
        if first is None:
            return
        yield first
        async for event in self._stream:
            yield event

    async def aclose(self) -> None:
        if not self._first.done():
            self._first.cancel()
        # The stream cannot be closed while its first step is still running somewhere.
        await asyncio.wait([self._first])
        if not self._first.cancelled():
            self._first.exception()  # retrieved: it is the consumer's to report, not the loop's
        await self._stream.aclose()


class Generations:
    """Starts, tracks, persists and interrupts generations; at most one per conversation."""

    def __init__(self, store: Store, billing: Billing, *, flush_interval: float, stale_after: float) -> None:
        self.store = store
        self.billing = billing
        self.flush_interval = flush_interval
        self.stale_after = stale_after
        self._running: dict[int, Generation] = {}
        self._exclusive = KeyedLock()  # one start or interrupt at a time per conversation
        self._ticker: asyncio.Task[None] | None = None
        # With a cluster store, processes sharing it act as one: a reply running in another one
        # is interrupted by a signal, and what a dead one left is taken over (core.cluster).
        self.cluster = store if isinstance(store, ClusterStore) else None
        self.instance: str | None = None
        self._handovers: dict[int, asyncio.Event] = {}  # replies another process was asked to stop
        self._signalled: set[asyncio.Task[Any]] = set()
        self._recovery: asyncio.Future[int] | None = None

    async def start(self) -> None:
        """Join the processes sharing the store, take over what crashed ones left (replies
        marked interrupted, their charges settled) and start persisting."""
        if self.cluster is not None:
            self.instance = await self.cluster.join(self._on_signal, self._on_standing)
            self.billing.standing = self.cluster.standing
        await self.sweep()
        self._ticker = asyncio.create_task(self._tick(), name="chatgate-generation-ticker")

    async def aclose(self) -> None:
        """Interrupt every running generation (persisting it) and stop the ticker."""
        await asyncio.gather(*(self.interrupt(cid) for cid in list(self._running)))
        if self._ticker:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._recovery is not None:  # a take-over under way settles what it took
            await asyncio.gather(self._recovery, return_exceptions=True)

    def current(self, conversation_id: int) -> Generation | None:
        """The generation running for a conversation, if any."""
        return self._running.get(conversation_id)

    async def run(
        self,
        conversation_id: int,
        message_id: int,
        route: Route,
        request: ChatRequest,
        *,
        reservation: Reservation | None = None,
        question_id: int | None = None,
        upstream: Upstream | None = None,
        revision: int = 0,
        newest: int | None = None,
    ) -> Generation:
        """Start producing the reply stored as ``message_id``, interrupting the conversation's current one.

        The caller appended the assistant message (status ``generating``)
        and, when billing applies, reserved its cost; the generation settles
        the reservation whatever the outcome. With ``upstream`` (the request
        already sent for ``request``) it takes that stream over instead of
        starting one. ``revision`` is the reply's as the caller wrote it, and
        ``newest`` the conversation's last message then (default: the reply): a
        message added after it by another process from then on, or the reply
        itself rewritten by one, stops the reply at its next flush (revision 0:
        from its first flush on).
        """
        async with self._exclusive.hold(conversation_id):
            await self._interrupt_locked(conversation_id)
            upstream = upstream or Upstream(route, request)
            generation = Generation(
                conversation_id,
                message_id,
                route,
                request,
                reservation,
                question_id,
                billing=self.billing,
                started=upstream.started,
            )
            generation._revision = revision
            generation._newest = message_id if newest is None else newest
            self._running[conversation_id] = generation
            producing = self._produce(generation, upstream)
            generation.task = asyncio.create_task(producing, name=f"chatgate-gen-{message_id}")
            return generation

    async def interrupt(self, conversation_id: int, *, stored: Message | None = None) -> bool:
        """Stop the conversation's running generation, if any, and wait until it is persisted.

        ``stored`` is the conversation's reply the store shows ``generating``, if the caller
        read one: when it does not run here, the process running it is asked to stop it
        (with a cluster store), and this waits until that one persisted it (at most
        :data:`HANDOVER_TIMEOUT`).
        """
        async with self._exclusive.hold(conversation_id):
            if await self._interrupt_locked(conversation_id):
                return True
        if stored is None or stored.status != "generating" or self.cluster is None:
            return False
        return await self._interrupt_elsewhere(conversation_id, stored.id)

    async def _interrupt_elsewhere(self, conversation_id: int, message_id: int) -> bool:
        assert self.cluster is not None
        stopped = self._handovers.setdefault(message_id, asyncio.Event())
        try:
            await self.cluster.signal(f"interrupt {conversation_id} {message_id}")
            async with asyncio.timeout(HANDOVER_TIMEOUT):
                await stopped.wait()
            return True
        except TimeoutError:
            log.warning("reply %d did not stop within %.0f s of the signal", message_id, HANDOVER_TIMEOUT)
            return False
        finally:
            self._handovers.pop(message_id, None)

    def _on_signal(self, message: str) -> None:
        """Another process's signal: stop a reply running here, or hear that one stopped."""
        verb, *args = message.split()
        try:
            numbers = [int(arg) for arg in args]
        except ValueError:
            numbers = []
        if verb == "interrupt" and len(numbers) == 2:
            conversation_id, message_id = numbers
            generation = self._running.get(conversation_id)
            if generation is not None and generation.message_id == message_id:
                self._background(self._stop_for_peer(conversation_id, message_id))
        elif verb == "stopped" and len(numbers) == 1:
            stopped = self._handovers.get(numbers[0])
            if stopped is not None:
                stopped.set()

    async def _stop_for_peer(self, conversation_id: int, message_id: int) -> None:
        assert self.cluster is not None
        try:
            async with self._exclusive.hold(conversation_id):
                generation = self._running.get(conversation_id)
                if generation is not None and generation.message_id == message_id:  # not a newer one
                    await self._interrupt_locked(conversation_id)
            await self.cluster.signal(f"stopped {message_id}")
        except Exception:
            log.exception("could not stop reply %d for another process", message_id)

    async def _recover_shielded(self) -> None:
        # What recover() took over is forgotten by the store once taken: its settlements must
        # not be cut short by a stopping ticker (aclose waits for them instead).
        if self.cluster is None or self.cluster.standing() is not None:
            return
        self._recovery = asyncio.ensure_future(self.recover())
        try:
            await asyncio.shield(self._recovery)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("could not take over what stopped processes left")

    async def recover(self) -> int:
        """Take over what processes that died left (with a cluster store): their replies are
        marked interrupted and settled, their reservations and leases settled."""
        if self.cluster is None:
            return 0
        replies, entries = await self.cluster.recover()
        for reply in replies:
            if (stopped := self._handovers.get(reply.id)) is not None:
                stopped.set()  # whoever waits for it to stop: it did, with its process
            try:
                await self.billing.settle_abandoned(reply)
            except Exception:  # the others still get settled; the stale sweep finds this one
                log.exception("could not settle the reservation of reply %d a stopped process left", reply.id)
        for entry in entries:
            try:
                await self.billing.settle_stale(entry)
            except Exception:
                log.exception("could not settle entry %d a stopped process left", entry.id)
        if replies or entries:
            log.warning(
                "took over what a stopped process left: %d reply(ies) marked interrupted, %d"
                " reservation(s) and lease(s) settled",
                len(replies),
                len(entries),
            )
        return len(replies) + len(entries)

    async def sweep(self) -> int:
        """Mark replies a crashed process stopped writing as interrupted, and settle their charges."""
        recovered = await self.recover()
        now = utcnow()
        orphans = await self.store.interrupt_stale_generations(now - timedelta(seconds=self.stale_after))
        for reply in orphans:
            await self.billing.settle_abandoned(reply)
        if orphans:
            log.warning(
                "marked %d reply(ies) left generating by a stopped process as interrupted", len(orphans)
            )
        stale = await self.store.stale_reservations(now - STALE_RESERVATION)
        for entry in stale:
            await self.billing.settle_stale(entry)
        if stale:
            log.warning("settled %d reservation(s) a stopped process left unsettled", len(stale))
        return recovered + len(orphans) + len(stale)

    async def _interrupt_locked(self, conversation_id: int) -> bool:
        generation = self._running.get(conversation_id)
        if generation is None or generation.task is None:
            return False
        # A task cancelled before its first step never enters _produce, so it
        # would never persist its end: let it start first.
        await generation._begun.wait()
        generation.task.cancel()
        await generation.wait()
        return True

    async def _produce(self, generation: Generation, upstream: Upstream) -> None:
        generation._begun.set()
        await generation.pump(upstream)
        # Finalising must complete even when shutdown cancels us again.
        await asyncio.shield(self._finish(generation))

    async def _finish(self, generation: Generation) -> None:
        assert generation.end is not None
        status, error = STATUS[generation.end], generation.error
        usage = generation.usage()
        patch = MessagePatch(
            content=generation.content,
            reasoning=generation.reasoning,
            status=status,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            error=error.message if error else None,
        )
        # The final write and the settlement go to the store together (one commit for both
        # where the store groups them); the charge is settled whether or not the reply could
        # be written: the tokens were spent either way.
        async with generation._write_lock:
            generation.done = True
            # A reply another process restarted in place is that one's now: read, not overwritten.
            write = (
                self.store.get_message(generation.message_id)
                if generation._taken
                else self.store.update_message(generation.message_id, patch)
            )
            written, settled = await asyncio.gather(write, generation.settle(usage), return_exceptions=True)
        message: Message | None = None
        if isinstance(written, BaseException):
            log.error("could not persist the end of reply %d", generation.message_id, exc_info=written)
            if not generation._outcome.done():
                generation._outcome.set_exception(written)
        else:
            message = written
        if isinstance(settled, BaseException):
            log.error("could not settle the charge of reply %d", generation.message_id, exc_info=settled)
        generation.done = True
        generation._wake()
        if self._running.get(generation.conversation_id) is generation:
            del self._running[generation.conversation_id]
        if message is not None and not generation._outcome.done():
            reason = generation.finish.reason if generation.finish else None
            outcome = Outcome(status, message, usage, reason, error, generation.tool_calls)
            generation._outcome.set_result(outcome)

    async def _tick(self) -> None:
        heartbeat = self.stale_after / 3
        swept_at = recovered_at = time.monotonic()
        while True:
            await asyncio.sleep(self.flush_interval)
            now = time.monotonic()
            if self.cluster is not None and now - recovered_at >= RECOVER_EVERY:
                recovered_at = now
                await self._recover_shielded()
            due = [
                generation
                for generation in self._running.values()
                if generation._dirty or now - generation._written_at >= heartbeat
            ]
            # Together, so the store commits them as one group (one after another, 32 replies
            # held the writer, and the replies starting meanwhile, for 32 round trips).
            await asyncio.gather(*(self._flush(generation, now) for generation in due))
            # Periodically too: replies a crash left shortly before this start were not stale yet.
            if now - swept_at >= self.stale_after:
                swept_at = now
                try:
                    await self.sweep()
                except Exception:
                    log.exception("could not sweep replies left generating")

    async def _flush(self, generation: Generation, now: float) -> None:
        async with generation._write_lock:
            if generation.done:
                return
            generation._dirty = False
            generation._written_at = now
            try:
                written = await self.store.update_message(
                    generation.message_id,
                    MessagePatch(content=generation.content, reasoning=generation.reasoning),
                )
            except Exception:
                generation._dirty = True  # try again next tick; the final write carries everything anyway
                log.exception("could not persist partial reply %d", generation.message_id)
                return
            last, generation._revision = generation._revision, written.revision
        if self.cluster is not None and last and written.revision > last + 1:
            # Someone else wrote to the conversation since this reply's last flush: if it was a
            # newer message, a signal that should have stopped this reply never came (two
            # questions at once on two processes; a lost datagram): stop it now.
            try:
                changed = await self.store.changed_messages(generation.conversation_id, last)
            except Exception:  # the next jump looks again
                log.exception("could not read conversation %d", generation.conversation_id)
                return
            # Added after the reply began (edits of later messages are no newer question), or
            # the reply itself written by someone else since this flush (restarted in place).
            added = any(message.id > generation._newest for message in changed)
            taken = any(
                message.id == generation.message_id and message.revision != written.revision
                for message in changed
            )
            if added or taken:
                log.warning("reply %d was superseded in another process; stopping it", generation.message_id)
                generation._taken = taken
                self._background(self._stop_superseded(generation))

    async def _stop_superseded(self, generation: Generation) -> None:
        async with self._exclusive.hold(generation.conversation_id):
            if self._running.get(generation.conversation_id) is generation:
                await self._interrupt_locked(generation.conversation_id)

    def _on_standing(self, standing: str | None) -> None:
        """Out of standing, others will take over what this process owns: stop its replies and
        retire its leases now, before they do. Back, it runs under its new instance id."""
        assert self.cluster is not None
        if standing is None:
            self.instance = self.cluster.instance_id()
            return
        if self.billing.leases is not None:
            self.billing.leases.retire_all()
        for conversation_id in list(self._running):
            self._background(self.interrupt(conversation_id))

    def _background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._signalled.add(task)
        task.add_done_callback(self._signalled.discard)
