"""The email-socket surface (seed 000): interruptible per-email conversations, polled with ``/api/record``."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
from litestar import Request, Router, post
from litestar.exceptions import HTTPException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.response import Response
from litestar.types import ControllerRouterHandler

from core.errors import ConfigError, ContextTooLong, InsufficientBalance, Problem, Superseded
from core.hookspecs import hookimpl
from core.locks import KeyedLock
from core.services.accounts import EMAIL, email_allowed, normalize_email
from core.services.conversations import Transcript
from core.services.generations import Generation
from core.store import Conversation, User
from core.streaming import PACE, ReplyStream
from core.surface import Surface
from core.types import ContentDelta, ReasoningDelta

KIND = "email"
log = logging.getLogger("chatgate.email_socket")


class Options(msgspec.Struct, forbid_unknown_fields=True):
    """``[surfaces.email_socket]`` options."""

    model: str = "mock-chat"
    """The model of ``[models]`` that answers every email."""
    allow: list[str] | None = None
    """Who may chat: exact addresses, ``*@domain`` patterns, or ``*`` for everyone.
    Unset: everyone while the server listens on a loopback address, no one otherwise."""
    show_think: bool = True
    """Whether ``/api/record`` (and streamed replies) show the model's reasoning as ``think``."""
    system_prompt: str = ""
    """Sent first in every conversation; empty: none."""
    summarize: bool = True
    """Fold turns that no longer fit the model's context into a rolling summary; off: drop them."""


def failure(status: int, message: str) -> Response[Any]:
    """The seed's error shape."""
    return Response({"status": False, "code": status, "error": message}, status_code=status)


class Invalid(Exception):
    """A request body the seed's API does not accept (400); ``str()`` says which field and why."""


class Refused(Exception):
    """An email the allow-list does not admit (403); ``str()`` says so."""


def fields(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body, with ``email`` checked and normalized."""
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise Invalid('the body must be a JSON object like {"email": "you@example.com"}') from None
    if not isinstance(body, dict):
        raise Invalid('the body must be a JSON object like {"email": "you@example.com"}')
    email = body.get("email")
    if email is None:
        raise Invalid("field 'email' is missing")
    if not isinstance(email, str) or not EMAIL.fullmatch(normalize_email(email)):
        raise Invalid(f"field 'email' must be an email address, got {email!r}")
    body["email"] = normalize_email(email)
    return body


def on_loopback(request: Request[Any, Any, Any]) -> bool:
    """Whether the request came in on a loopback address (or a Unix socket)."""
    server = request.scope.get("server")
    if not server:
        return True
    try:
        return ipaddress.ip_address(server[0]).is_loopback
    except ValueError:
        return server[0] == "localhost"


def record_entries(transcript: Transcript, show_think: bool) -> list[dict[str, str]]:
    """The seed's ``text`` array: oldest first, ``think`` and ``status`` only where they apply."""
    entries = []
    for message in transcript.messages:
        if message.role == "user":
            entries.append({"role": "user", "content": message.content})
            continue
        entry = {"role": "ai", "content": message.content}
        if show_think and message.reasoning:
            entry["think"] = message.reasoning
        if message.status in ("interrupted", "error"):
            entry["status"] = message.status
        entries.append(entry)
    return entries


def event(obj: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


class EmailSocketSurface(Surface):
    """Conversations keyed by email address, as the seed's clients expect.

    Promises: one conversation per email, isolated from every other; a newer
    ``/api/chat`` interrupts the running reply (its caller gets ``exit: 1``)
    and answers with the partial exchange in context; nothing stored is lost
    by a failure or an interrupt; every error is
    ``{"status": false, "code": N, "error": ...}``. Interrupts reach replies
    running in this process: run one worker per email-socket server.
    """

    name = "email_socket"
    Options = Options

    def __init__(self, options: Options, services: Any) -> None:
        super().__init__(options, services)
        config = services.config
        if options.model not in config.models:
            known = ", ".join(sorted(config.models)) or "none configured"
            raise ConfigError(
                [
                    Problem(
                        file=str(config.path),
                        key="surfaces.email_socket.model",
                        expected=f"one of the models of [models] ({known})",
                        found=repr(options.model),
                    )
                ]
            )

    def route_handlers(self) -> Sequence[ControllerRouterHandler]:
        services = self.services
        options: Options = self.options
        route = services.catalog.route(options.model)
        system = options.system_prompt or None
        starting = KeyedLock()

        def admit(request: Request[Any, Any, Any], email: str) -> None:
            allow = options.allow
            if allow is None:
                allow = ["*"] if on_loopback(request) else []
            if not email_allowed(email, allow):
                raise Refused(f"{email} is not allowed to use this service; ask the operator to add it")

        async def admitted_email(request: Request[Any, Any, Any]) -> str:
            email: str = fields(await request.body())["email"]
            admit(request, email)
            return email

        async def conversation_of(user: User) -> Conversation:
            return await services.conversations.latest(user.id, KIND) or await services.conversations.create(
                user.id, KIND
            )

        async def supersede(user: User) -> None:
            # Before waiting for the email's lock: a question still being prepared holds it.
            latest = await services.conversations.latest(user.id, KIND)
            if latest is not None:
                services.conversations.supersede(latest.id)

        @post(
            "/api/chat",
            tags=["email-socket"],
            summary="Send a message; answers when the reply ends",
            status_code=200,
        )
        async def chat(request: Request[Any, Any, Any]) -> Response[Any]:
            body = fields(await request.body())
            question = body.get("inp")
            if not isinstance(question, str) or not question.strip():
                raise Invalid("field 'inp' is missing or empty; send the message as a string")
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise Invalid(f"field 'stream' must be true or false, got {stream!r}")
            admit(request, body["email"])
            user = await services.accounts.ensure_user(body["email"])
            await supersede(user)
            try:
                # Per email, so two first messages make one conversation and /api/clear
                # never splits a question from its reply.
                async with starting.hold(user.id):
                    conversation = await conversation_of(user)
                    generation = await services.conversations.ask(
                        conversation, route, question, system=system, summarize=options.summarize
                    )
            except Superseded:
                return Response({"status": True, "code": 200, "exit": 1})
            except ContextTooLong as exc:
                return failure(400, f"field 'inp' is too long: {exc}")
            except InsufficientBalance:
                return failure(403, f"the balance of {user.email} is used up; ask the operator to top it up")
            if stream:
                return ReplyStream(streamed(generation), "text/event-stream")
            return await ended(generation)

        async def ended(generation: Generation) -> Response[Any]:
            try:
                outcome = await generation.wait()
            except asyncio.CancelledError:
                # Only a stopping server cancels a waiting /api/chat: stop the reply (it is
                # saved as interrupted) and tell the caller how it ended.
                if services.generations.current(generation.conversation_id) is generation:
                    await asyncio.shield(services.generations.interrupt(generation.conversation_id))
                outcome = await asyncio.shield(generation.wait())
            except Exception:  # the store could not record the end; the log has why
                return failure(500, "the reply could not be saved; see the server log")
            if outcome.status == "error":
                return failure(500, outcome.error.message if outcome.error else "the reply failed")
            return Response({"status": True, "code": 200, "exit": int(outcome.status == "interrupted")})

        async def streamed(generation: Generation) -> AsyncIterator[bytes]:
            async for part in generation.follow(PACE):
                if isinstance(part, ContentDelta) and part.text:
                    yield event({"content": part.text})
                elif isinstance(part, ReasoningDelta) and part.text and options.show_think:
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

        @post("/api/record", tags=["email-socket"], summary="The conversation of an email", status_code=200)
        async def record(request: Request[Any, Any, Any]) -> Response[Any]:
            user = await services.accounts.find_user(await admitted_email(request))
            conversation = await services.conversations.latest(user.id, KIND) if user else None
            if conversation is None:
                return Response({"text": [], "code": 200})
            transcript = await services.conversations.transcript(conversation)
            text = record_entries(transcript, options.show_think)
            return Response({"text": text, "code": 201 if transcript.generating else 200})

        @post("/api/clear", tags=["email-socket"], summary="Start a fresh conversation", status_code=200)
        async def clear(request: Request[Any, Any, Any]) -> Response[Any]:
            user = await services.accounts.find_user(await admitted_email(request))
            if user is None:
                return Response({"status": True, "code": 200})
            await supersede(user)
            async with starting.hold(user.id):
                conversation = await services.conversations.latest(user.id, KIND)
                if conversation is not None:
                    await services.generations.interrupt(conversation.id)
                    # Read again after the interrupt: it may have stored a partial reply.
                    current = await services.conversations.get(user.id, conversation.id)
                    if await services.conversations.messages(current):
                        await services.conversations.create(user.id, KIND)
            return Response({"status": True, "code": 200})

        limit = services.config.server.max_body_bytes

        def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
            if isinstance(exc, Invalid):
                return failure(400, str(exc))
            if isinstance(exc, Refused):
                return failure(403, str(exc))
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

        return [
            Router(
                "/",
                route_handlers=[chat, record, clear],
                exception_handlers={HTTPException: http_error, Exception: handle},
            )
        ]


@hookimpl
def register_surfaces() -> list[type[Surface]]:
    return [EmailSocketSurface]
