"""``n > 1``: several completions of one request, answered as the choices of one reply.

Each choice is a :class:`~core.Completion` of its own (its own upstream request, reservation
and ledger entry), started all or none (:meth:`~core.services.completions.Completions.start_many`).
They are not passed upstream as one request with ``n``: then every provider's event stream
would have to carry choice indices, a contract change for every provider author, and DeepSeek
documents no ``n`` at all. Streamed, the choices' chunks interleave as they come, each with its
``index``, after every choice's role chunk in ascending order (the openai SDK's stream helper
appends a choice at its first chunk); ``include_usage`` gets one usage chunk, summed over the
choices, after all of them finished. A choice that fails ends the whole reply (a status code
before the stream began, an error event after) and stops the others. Answered with an error
status, no choice is charged (a refused request costs nothing, even its choices that finished:
they settle only once the answer is decided); after the stream began, each is charged what it
produced, as a single reply would be.
"""

from __future__ import annotations

import asyncio
import contextlib

from litestar.types import Send

from core import (
    Completion,
    Finish,
    ProviderError,
    ProviderEvent,
    Usage,
    json_answer,
    send_answer,
    start_stream,
)

from . import wire
from .answers import provider_error, stream_error
from .chunks import cancel_all, charge_all, opening, render, waive_all, whole_extras

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"

Item = tuple[int, ProviderEvent | ProviderError | None]
"""What a choice's reader passes on: its index and an event, its failure, or None at its end."""


async def whole(
    send: Send, completions: list[Completion], parsed: wire.Parsed, headers: dict[str, str]
) -> None:
    """Answer every choice in one ``chat.completion``, or the first failure's status (all free)."""
    try:
        await _whole(send, completions, parsed, headers)
    finally:
        charge_all(completions)  # every choice not waived: it was answered, or the client left


async def _whole(
    send: Send, completions: list[Completion], parsed: wire.Parsed, headers: dict[str, str]
) -> None:
    waits = [asyncio.ensure_future(c.result()) for c in completions]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for wait in waits:
            wait.cancel()
    for wait in waits:
        if wait.done() and not wait.cancelled() and isinstance(failure := wait.exception(), ProviderError):
            waive_all(completions)  # a refused request costs nothing, even its choices that finished
            return await send_answer(send, provider_error(failure))
    if any(c.finish is None for c in completions):
        return None  # the client left; there is nobody to answer
    reply = wire.Reply(completions[0].request.model)
    choices = []
    usages: list[Usage] = []
    for index, completion in enumerate(completions):
        finish = completion.finish
        assert finish is not None
        fingerprint, logprobs = whole_extras(completion, parsed.logprobs)
        reply.saw(fingerprint)
        choices.append(
            wire.choice_body(
                index, completion.content, completion.reasoning, list(completion.tool_calls), finish, logprobs
            )
        )
        usages.append(finish.usage)
    await send_answer(
        send, json_answer(wire.choices_body(reply, choices, wire.summed(usages)), headers=headers)
    )


async def _read(index: int, completion: Completion, queue: asyncio.Queue[Item]) -> None:
    try:
        while (event := await completion.next_event()) is not None:
            queue.put_nowait((index, event))
            for ready in completion.ready_events():
                queue.put_nowait((index, ready))
        queue.put_nowait((index, None))
    except ProviderError as exc:
        queue.put_nowait((index, exc))


def _drain(queue: asyncio.Queue[Item]) -> list[Item]:
    items = []
    with contextlib.suppress(asyncio.QueueEmpty):
        while True:
            items.append(queue.get_nowait())
    return items


async def stream(
    send: Send, completions: list[Completion], parsed: wire.Parsed, headers: dict[str, str], interval: float
) -> None:
    """Stream every choice's chunks as they come (see the module's docstring)."""
    queue: asyncio.Queue[Item] = asyncio.Queue()
    readers = [asyncio.create_task(_read(i, c, queue)) for i, c in enumerate(completions)]
    try:
        await _stream(send, completions, parsed, headers, interval, queue)
    finally:
        for reader in readers:
            reader.cancel()
        charge_all(completions)  # every choice not waived: the stream began, or the client left


async def _stream(
    send: Send,
    completions: list[Completion],
    parsed: wire.Parsed,
    headers: dict[str, str],
    interval: float,
    queue: asyncio.Queue[Item],
) -> None:
    count = len(completions)
    # Wait for every choice's first word (an event, its end or its failure) before answering,
    # so a request the upstream refuses gets a real status code, as a single choice's does.
    items: list[Item] = []
    heard: set[int] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + interval
    while len(heard) < count:
        try:
            item = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            break  # slow to start: answer now, and keep the connection alive meanwhile
        index, what = item
        if isinstance(what, ProviderError):
            waive_all(completions)  # answered with a status: nothing delivered, nothing charged
            return await send_answer(send, provider_error(what))
        items.append(item)
        heard.add(index)
    await start_stream(send, headers)
    reply = wire.Reply(completions[0].request.model)
    for _, what in items:
        if what is not None and not isinstance(what, ProviderError):
            reply.saw(what.system_fingerprint)
    usage, logprobs = parsed.include_usage, parsed.logprobs
    out = b"".join(opening(reply, parsed, index) for index in range(count))
    ended = 0
    usages: dict[int, Usage] = {}
    try:
        while True:
            for index, what in items:
                if what is None:
                    ended += 1
                elif isinstance(what, ProviderError):
                    raise what
                else:
                    if isinstance(what, Finish):
                        usages[index] = what.usage
                    out += render(reply, what, usage, index=index, logprobs=logprobs, usage_chunk=False)
            if ended == count:
                break
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
                out = b""
            try:
                first = await asyncio.wait_for(queue.get(), interval)
            except TimeoutError:
                await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})
                items = []
                continue
            items = [first, *_drain(queue)]
        if usage:
            out += wire.usage_chunk(reply, wire.summed([usages[i] for i in sorted(usages)]))
    except ProviderError as exc:
        cancel_all(completions)  # one choice failed: the reply as a whole did
        out += stream_error(exc)  # too late for a status code
    await send({"type": "http.response.body", "body": out + DONE, "more_body": False})
