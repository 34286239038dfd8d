"""A reply as the seed streams it: plain text as it is generated, then ``¦`` and its metadata."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from litestar.response import Response

from core import PACE, ContentDelta, Conversation, Finish, Generation, ProviderEvent, ReplyStream, Services

from .errors import failure, provider_status
from .options import Options
from .wire import ReplyMeta, tail

log = logging.getLogger("chatgate.topic_chat")


async def instructions(
    services: Services, options: Options, query: str, web: bool
) -> tuple[str | None, str | None]:
    """The system prompt, with web results for ``query`` when ``web`` asks for them; and how the
    search went (``used``, ``no_results``, ``failed``, ``unavailable``; None when not asked for)."""
    system = options.system_prompt or None
    if not web:
        return system, None
    search = services.web_search
    if search is None:
        return system, "unavailable"
    try:
        results = await search.search(query, options.web_results)
    except Exception as exc:  # a failed search never fails the reply
        log.warning("web search %r failed: %s: %s", search.name, type(exc).__name__, exc)
        return system, "failed"
    if not results:
        return system, "no_results"
    lines = [f"{i}. {r.title} ({r.url})\n{r.snippet}" for i, r in enumerate(results, 1)]
    found = "Web search results for the user's message; use them where they help:\n\n" + "\n\n".join(lines)
    return f"{system}\n\n{found}" if system else found, "used"


async def reply_stream(
    topic: Conversation, generation: Generation, web: str | None, first_text_wait: float
) -> Response[dict[str, object]] | ReplyStream:
    """``generation`` streamed as ``text/plain``: its text, then ``¦`` and :class:`ReplyMeta`.

    Promises: a reply the upstream refuses before any text, within
    ``first_text_wait`` seconds, answers the upstream's status in the seed's
    error shape (with the metadata's fields); after that, a failure can only
    be told in the metadata (``status``, ``error``).
    """
    meta = ReplyMeta(generation.question_id, generation.message_id, topic.id)
    if web is not None:
        meta.web_search = web
    batches = generation.batches(PACE)

    async def first_text() -> str:
        async for batch in batches:
            text = _text(batch)
            if text or any(isinstance(e, Finish) for e in batch):
                return text
        return ""

    # Wait for the first text, so a reply the upstream refuses gets a real status code;
    # but not for long (a reasoning model thinks first): then the headers go out anyway.
    opening = asyncio.ensure_future(first_text())
    await asyncio.wait({opening}, timeout=first_text_wait)
    if opening.done() and not opening.result():
        try:
            outcome = await generation.wait()
        except Exception:
            outcome = None
        if outcome is not None and outcome.status == "error" and outcome.error and not generation.content:
            return failure(provider_status(outcome.error), outcome.error.message, **meta.fields())

    async def body() -> AsyncIterator[bytes]:
        if first := await opening:
            yield first.encode()
        async for batch in batches:
            if text := _text(batch):
                yield text.encode()
        try:
            outcome = await generation.wait()
        except Exception:  # the reply could not be saved; the log has why
            meta.status, meta.error = "error", "the reply could not be saved"
        else:
            if outcome.status != "complete":
                meta.status = outcome.status
                if outcome.error is not None:
                    meta.error = outcome.error.message
        yield tail(meta)

    return ReplyStream(body(), "text/plain; charset=utf-8")


def _text(batch: list[ProviderEvent]) -> str:
    return "".join(e.text for e in batch if isinstance(e, ContentDelta))
