"""The email-socket surface (seed 000): interruptible per-email conversations, polled with ``/api/record``."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
from litestar import Request, Router, post
from litestar.exceptions import HTTPException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.response import Response
from litestar.types import ControllerRouterHandler

from core import (
    EMAIL,
    PACE,
    ConfigError,
    ContentDelta,
    ContextTooLong,
    Conversation,
    Generation,
    InvalidBody,
    KeyedLock,
    Payer,
    Problem,
    Quota,
    RateLimitExceeded,
    ReasoningDelta,
    ReplyStream,
    Services,
    Superseded,
    Surface,
    Transcript,
    User,
    decode_body,
    email_allowed,
    hookimpl,
    normalize_email,
)

KIND = "email"
log = logging.getLogger("chatgate.email_socket")


class Options(msgspec.Struct, forbid_unknown_fields=True):
    """``[surfaces.email_socket]`` options."""

    model: str = "mock-chat"
    """The model of ``[models]`` that answers every email."""
    allow: list[str] | None = None
    """Who may chat: exact addresses, ``*@domain`` patterns, or ``*`` for everyone, whatever
    the caller's address. Unset: only callers on this machine, that is a loopback client
    address (or a Unix socket) and none of the proxy headers of :data:`PROXY_HEADERS`
    (``Forwarded``, ``X-Forwarded-For``, ``X-Real-IP``, ``Via``...); everyone else gets 403."""
    requests_per_minute: int = 20
    """``/api/chat`` requests each email may make in a minute (summaries count too); 0: no limit."""
    tokens_per_day: int = 200_000
    """Prompt and reply tokens each email may use in 24 hours; once they are reached, its
    chats are refused until enough are a day old; 0: no limit."""
    show_think: bool = True
    """Whether ``/api/record`` (and streamed replies) show the model's reasoning as ``think``."""
    system_prompt: str = ""
    """Sent first in every conversation; empty: none."""
    summarize: bool = True
    """Fold turns that no longer fit the model's context into a rolling summary; off: drop them."""

    def __post_init__(self) -> None:
        for field in ("requests_per_minute", "tokens_per_day"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} to be >= 0 (0: no limit)")

    def quota(self) -> Quota:
        """What each email may use."""
        return Quota(self.requests_per_minute or None, self.tokens_per_day or None)


def failure(status: int, message: str) -> Response[Any]:
    """The seed's error shape."""
    return Response({"status": False, "code": status, "error": message}, status_code=status)


class Invalid(Exception):
    """A request body the seed's API does not accept (400); ``str()`` says which field and why."""


class Refused(Exception):
    """An email the allow-list does not admit (403); ``str()`` says so."""


class Unsupported(Exception):
    """A body that is not declared JSON (415): a page of another site can post a form or
    ``text/plain`` to a local server without asking, but not JSON."""


MAX_EMAIL = 254  # the longest address SMTP carries (RFC 5321's path, less its brackets)
PROXY_HEADERS = frozenset(
    {
        b"forwarded",
        b"forwarded-for",
        b"via",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-forwarded-port",
        b"x-real-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
        b"cf-connecting-ip",
        b"true-client-ip",
    }
)
"""Headers a proxy adds to what it passes on (lowercase, as ASGI names them): any of them and
the caller is not taken for local. nginx's plain ``proxy_pass`` adds none, so such a proxy must
be told to send ``X-Forwarded-For``."""
MAX_SHOWN = 60  # of a refused value echoed in an error: the body may be a megabyte


def json_content(request: Request[Any, Any, Any]) -> None:
    """:class:`Unsupported` unless the body is declared ``application/json`` or ``application/*+json``."""
    declared = request.headers.get("content-type", "")
    media = declared.partition(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        shown = repr(media[:60]) if media else "none"
        raise Unsupported(f"the body must be JSON sent as Content-Type: application/json (got {shown})")


def fields(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body, with ``email`` checked and normalized."""
    try:
        body = decode_body(raw)
    except InvalidBody as exc:
        raise Invalid(f'{exc}; send a JSON object like {{"email": "you@example.com"}}') from None
    if not isinstance(body, dict):
        raise Invalid('the body must be a JSON object like {"email": "you@example.com"}')
    email = body.get("email")
    if email is None:
        raise Invalid("field 'email' is missing")
    if isinstance(email, str) and len(normalize_email(email)) > MAX_EMAIL:
        raise Invalid(f"field 'email' is longer than {MAX_EMAIL} characters")
    if not isinstance(email, str) or not EMAIL.fullmatch(normalize_email(email)):
        raise Invalid(f"field 'email' must be an email address, got {shown(email)}")
    body["email"] = normalize_email(email)
    return body


def shown(value: Any) -> str:
    """``repr(value)``, cut to :data:`MAX_SHOWN` characters."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "…"


def local_caller(request: Request[Any, Any, Any]) -> bool:
    """Whether the caller is on this machine: its client address is loopback (or it came over a
    Unix socket) and it carries no proxy header.

    The client address, not the address the server listens on: behind a reverse proxy on the
    same host every request arrives on loopback. A proxy header means someone else's request
    was passed on, whoever passed it.
    """
    # One pass over the raw header names, each a set lookup: cheap on every request.
    if any(name in PROXY_HEADERS for name, _ in request.scope["headers"]):
        return False
    client = request.scope.get("client")
    if not client:
        return True
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def limited(exc: RateLimitExceeded) -> Response[Any]:
    """429 in the seed's shape, with ``Retry-After``."""
    wait = max(1, math.ceil(exc.retry_after))
    if exc.limit == "tokens_per_day":
        message = f"this email has used its {exc.allowed} tokens of the last 24 hours; retry in {wait} s"
    else:
        message = f"too many requests: this email may send {exc.allowed} a minute; retry in {wait} s"
    response = failure(429, message)
    response.headers["Retry-After"] = str(wait)
    return response


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

    Who calls: an email is an identity by its address alone, so with ``allow``
    unset only callers on this machine are admitted (loopback client, no proxy
    header; see :func:`local_caller`), and with it set the allow-list decides
    (behind a proxy, ``[server] forwarded_allow_ips`` makes the client address
    the proxy's caller's). Bodies must be declared JSON (415 otherwise), so a web
    page cannot drive a local server. An email's usage never spends a balance: it
    is recorded under the email at its tokens with amount 0, within the per-email
    quotas ``requests_per_minute`` and ``tokens_per_day`` (429 with Retry-After
    past them). A refused request (400, 403, 415, 429) writes nothing and creates
    no user.
    """

    name = "email_socket"
    Options = Options

    def route_handlers(self, services: Services) -> Sequence[ControllerRouterHandler]:
        options: Options = self.options
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
        route = services.catalog.route(options.model)
        system = options.system_prompt or None
        starting = KeyedLock()

        def admit(request: Request[Any, Any, Any], email: str) -> None:
            allow = options.allow
            if allow is None:
                allow = ["*"] if local_caller(request) else []
            if not email_allowed(email, allow):
                raise Refused(f"{email} is not allowed to use this service; ask the operator to add it")

        async def admitted_email(request: Request[Any, Any, Any]) -> str:
            json_content(request)
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
            json_content(request)
            body = fields(await request.body())
            question = body.get("inp")
            if not isinstance(question, str) or not question.strip():
                raise Invalid("field 'inp' is missing or empty; send the message as a string")
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise Invalid(f"field 'stream' must be true or false, got {shown(stream)}")
            admit(request, body["email"])
            payer = Payer(quota=options.quota())
            try:
                user = await services.accounts.find_user(body["email"])
                if user is None:
                    # What refuses a new email refuses it before it exists (the quota cannot:
                    # nothing was used yet).
                    services.conversations.opening(route, question, system=system)
                    user = await services.accounts.ensure_user(body["email"])
                # Admitted before a running question is superseded: a refused one stops nothing.
                admitted = await services.conversations.admit(
                    user.id, route, question, system=system, payer=payer
                )
                try:
                    await supersede(user)
                    # Per email, so two first messages make one conversation and /api/clear
                    # never splits a question from its reply.
                    async with starting.hold(user.id):
                        conversation = await conversation_of(user)
                        taken, admitted = admitted, None  # ask's from here on
                        generation = await services.conversations.ask(
                            conversation,
                            route,
                            question,
                            system=system,
                            summarize=options.summarize,
                            payer=payer,
                            admitted=taken,
                        )
                finally:
                    if admitted is not None:
                        # Nothing went upstream. Shielded: were this caller cancelled again while
                        # releasing, the reservation would count in flight until swept as stale.
                        await asyncio.shield(services.billing.release(admitted))
            except Superseded:
                return Response({"status": True, "code": 200, "exit": 1})
            except ContextTooLong as exc:
                return failure(400, f"field 'inp' is too long: {exc}")
            except RateLimitExceeded as exc:
                return limited(exc)
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
            if isinstance(exc, Unsupported):
                return failure(415, str(exc))
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
