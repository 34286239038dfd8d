"""The seed's shapes: request bodies checked in, answers and errors rendered out.

Bodies are decoded by :func:`core.decode_body` into structs whose fields are taken
as sent, then checked here in the seed's order, so each 400 names its field and
echoes (cut short) what was sent: ``{"status": false, "code": N, "error": ...}``.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import msgspec
from litestar.response import Response

from core import EMAIL, InvalidBody, RateLimitExceeded, Transcript, decode_body, normalize_email

MAX_EMAIL = 254  # the longest address SMTP carries (RFC 5321's path, less its brackets)
MAX_SHOWN = 60  # of a refused value echoed in an error: the body may be a megabyte
EXAMPLE = '{"email": "you@example.com"}'

S = TypeVar("S", bound=msgspec.Struct)


class EmailFields(msgspec.Struct):
    """The body of ``/api/record`` and ``/api/clear`` as sent; other fields are ignored.

    Typed ``object`` so that a wrong value reaches :func:`read_email`, whose message
    is the seed's, not msgspec's.
    """

    email: object = None


class ChatFields(EmailFields):
    """The body of ``/api/chat`` as sent."""

    inp: object = None
    stream: object = False


class Chat(msgspec.Struct, frozen=True):
    """A checked ``/api/chat`` body: the normalized email, the question, whether to stream."""

    email: str
    inp: str
    stream: bool


class Invalid(Exception):
    """A request body the seed's API does not accept (400); ``str()`` says which field and why."""


def decoded(raw: bytes, fields: type[S]) -> S:
    """``raw`` decoded into ``fields``, or :class:`Invalid` saying what a body must be."""
    try:
        # Any JSON first, then the struct: a body nested too deeply is told so whatever
        # its shape (decoding straight into the struct stops at an array's first byte).
        body = decode_body(raw)
    except InvalidBody as exc:
        raise Invalid(f"{exc}; send a JSON object like {EXAMPLE}") from None
    if not isinstance(body, dict):
        raise Invalid(f"the body must be a JSON object like {EXAMPLE}")
    return msgspec.convert(body, fields)  # every field takes any value: nothing to refuse


def read_email(raw: bytes) -> str:
    """The normalized ``email`` of a body, checked."""
    return checked_email(decoded(raw, EmailFields).email)


def read_chat(raw: bytes) -> Chat:
    """An ``/api/chat`` body, checked: ``email``, then ``inp``, then ``stream``."""
    fields = decoded(raw, ChatFields)
    email = checked_email(fields.email)
    if not isinstance(fields.inp, str) or not fields.inp.strip():
        raise Invalid("field 'inp' is missing or empty; send the message as a string")
    if not isinstance(fields.stream, bool):
        raise Invalid(f"field 'stream' must be true or false, got {shown(fields.stream)}")
    return Chat(email, fields.inp, fields.stream)


def checked_email(email: object) -> str:
    """``email`` normalized, or :class:`Invalid` naming the field (``null`` counts as missing)."""
    if email is None:
        raise Invalid("field 'email' is missing")
    if isinstance(email, str) and len(normalize_email(email)) > MAX_EMAIL:
        raise Invalid(f"field 'email' is longer than {MAX_EMAIL} characters")
    if not isinstance(email, str) or not EMAIL.fullmatch(normalize_email(email)):
        raise Invalid(f"field 'email' must be an email address, got {shown(email)}")
    return normalize_email(email)


def shown(value: object) -> str:
    """``repr(value)``, cut to :data:`MAX_SHOWN` characters."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "…"


def failure(status: int, message: str) -> Response[Any]:
    """The seed's error shape."""
    return Response({"status": False, "code": status, "error": message}, status_code=status)


def done(interrupted: bool) -> Response[Any]:
    """The seed's answer to ``/api/chat``: ``exit`` is 1 when the reply was interrupted."""
    return Response({"status": True, "code": 200, "exit": int(interrupted)})


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
    """One server-sent event of a streamed ``/api/chat``."""
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"
