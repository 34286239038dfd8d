"""The seed's routes: ``/api/chat``, ``/api/record`` and ``/api/clear``, and their error shape.

The handlers read and check the body (declared JSON first, then its fields, then
who may use the email), call :class:`~.chats.Chats` and render the seed's answers.
The body is read by hand, after the ``Content-Type`` check: a page of another site
gets its 415 whatever it sends.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from litestar import Controller, Request, post
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.response import Response
from litestar.types import ExceptionHandlersMap

from core import (
    PACE,
    ContentDelta,
    ContextTooLong,
    Generation,
    OutOfStanding,
    RateLimitExceeded,
    ReasoningDelta,
    ReplyStream,
    Superseded,
)

from .callers import Refused, Unsupported, admit, json_content
from .chats import Chats
from .wire import Invalid, done, event, failure, limited, read_chat, read_email, record_entries

log = logging.getLogger("chatgate.email_socket")


class EmailController(Controller):
    """``/api/chat``, ``/api/record`` and ``/api/clear``, given the surface's :class:`Chats` as ``chats``."""

    path = "/"
    tags = ("email-socket",)

    @post("/api/chat", summary="Send a message; answers when the reply ends", status_code=200)
    async def chat(self, request: Request[Any, Any, Any], chats: NamedDependency[Chats]) -> Response[Any]:
        json_content(request)
        sent = read_chat(await request.body())
        admit(request, sent.email, chats.options.allow)
        try:
            generation = await chats.ask(sent.email, sent.inp)
        except Superseded:
            return done(interrupted=True)
        except ContextTooLong as exc:
            return failure(400, f"field 'inp' is too long: {exc}")
        except RateLimitExceeded as exc:
            return limited(exc)
        if sent.stream:
            return ReplyStream(streamed(generation, chats.options.show_think), "text/event-stream")
        outcome = await chats.outcome(generation)
        if outcome is None:
            return failure(500, "the reply could not be saved; see the server log")
        if outcome.status == "error":
            return failure(500, outcome.error.message if outcome.error else "the reply failed")
        return done(interrupted=outcome.status == "interrupted")

    @post("/api/record", summary="The conversation of an email", status_code=200)
    async def record(self, request: Request[Any, Any, Any], chats: NamedDependency[Chats]) -> Response[Any]:
        transcript = await chats.transcript(await admitted_email(request, chats))
        if transcript is None:
            return Response({"text": [], "code": 200})
        text = record_entries(transcript, chats.options.show_think)
        return Response({"text": text, "code": 201 if transcript.generating else 200})

    @post("/api/clear", summary="Start a fresh conversation", status_code=200)
    async def clear(self, request: Request[Any, Any, Any], chats: NamedDependency[Chats]) -> Response[Any]:
        await chats.clear(await admitted_email(request, chats))
        return Response({"status": True, "code": 200})


async def admitted_email(request: Request[Any, Any, Any], chats: Chats) -> str:
    """The email of a ``{"email"}`` body, declared JSON, checked and admitted."""
    json_content(request)
    email = read_email(await request.body())
    admit(request, email, chats.options.allow)
    return email


async def streamed(generation: Generation, show_think: bool) -> AsyncIterator[bytes]:
    """A reply as server-sent events: its deltas, then how it ended in the seed's shape."""
    async for part in generation.follow(PACE):
        if isinstance(part, ContentDelta) and part.text:
            yield event({"content": part.text})
        elif isinstance(part, ReasoningDelta) and part.text and show_think:
            yield event({"think": part.text})
    try:
        outcome = await generation.wait()
    except Exception:
        yield event({"status": False, "code": 500, "error": "the reply could not be saved"})
        return
    if outcome.status == "error":
        message = outcome.error.message if outcome.error else "the reply failed"
        yield event({"status": False, "code": 500, "error": message})
    else:
        yield event({"status": True, "code": 200, "exit": int(outcome.status == "interrupted")})


def exception_handlers(limit: int) -> ExceptionHandlersMap:
    """Every refusal and failure in the seed's shape; ``limit`` is the server's body limit."""

    def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        if isinstance(exc, Invalid):
            return failure(400, str(exc))
        if isinstance(exc, Refused):
            return failure(403, str(exc))
        if isinstance(exc, Unsupported):
            return failure(415, str(exc))
        if isinstance(exc, OutOfStanding):  # fail closed: another instance answers meanwhile
            return failure(503, str(exc))
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return failure(500, f"internal error ({type(exc).__name__}); the server log has the details")

    def http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
        # Litestar's own refusals (oversized body, wrong method) in the seed's shape too.
        message = exc.detail
        if isinstance(exc, RequestEntityTooLarge):
            message = f"the request body is larger than this server's limit of {limit} bytes"
        response = failure(exc.status_code, message)
        response.headers.update(exc.headers or {})
        return response

    return {HTTPException: http_error, Exception: handle}
