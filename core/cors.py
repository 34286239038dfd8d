"""Cross-origin calls from browsers, for the origins the operator names (``[server] cors_origins``).

Applied at the front door (:class:`core.app.Gateway`), so every route of every surface
answers alike, the raw-ASGI ``/v1/chat/completions`` included, which Litestar's own CORS
support (a router feature) would not reach. Requests without an ``Origin`` header, or from
an origin not named, are served exactly as before: no CORS header, so a browser keeps the
answer from the page that asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from litestar.types import HTTPResponseBodyEvent, HTTPResponseStartEvent, HTTPScope, Message, Send

METHODS = b"GET, POST, PUT, PATCH, DELETE, OPTIONS"
MAX_AGE = b"600"
"""Seconds a browser may reuse a preflight's answer."""


def origin_problem(origin: str) -> str | None:
    """Why ``origin`` is not an origin a browser sends (None when it is one, or ``*``)."""
    if origin == "*":
        return None
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"origins such as https://app.example.com (found {origin!r})"
    if parts.path or parts.query or parts.fragment or parts.username or origin.endswith("/"):
        return f"bare origins, scheme://host[:port] with no path (found {origin!r})"
    return None


class Cors:
    """The CORS answers for a set of allowed origins (``*``: any).

    Promises: a preflight (``OPTIONS`` with ``Access-Control-Request-Method``) from an
    allowed origin is answered 204 with the methods and the headers it asked for, before
    any route is looked up; any other request from an allowed origin gets
    ``Access-Control-Allow-Origin`` (and every response header exposed, so a page reads
    the rate-limit headers); other requests are left alone. Never ``Allow-Credentials``:
    keys travel in ``Authorization``, not cookies.
    """

    def __init__(self, origins: Sequence[str]) -> None:
        self.any = "*" in origins
        self.origins = {origin.lower().encode() for origin in origins if origin != "*"}

    def origin_of(self, scope: HTTPScope) -> bytes | None:
        """The request's ``Origin`` when it is allowed, else None."""
        for name, value in scope["headers"]:
            if name == b"origin":
                return value if self.any or value.lower() in self.origins else None
        return None

    @staticmethod
    def is_preflight(scope: HTTPScope) -> bool:
        return scope["method"] == "OPTIONS" and any(
            name == b"access-control-request-method" for name, _ in scope["headers"]
        )

    async def preflight(self, scope: HTTPScope, origin: bytes, send: Send) -> None:
        requested = next((v for n, v in scope["headers"] if n == b"access-control-request-headers"), b"")
        headers = [
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-methods", METHODS),
            (b"access-control-max-age", MAX_AGE),
            (b"vary", b"origin, access-control-request-method, access-control-request-headers"),
            (b"content-length", b"0"),
        ]
        if requested:
            headers.append((b"access-control-allow-headers", requested))
        start: HTTPResponseStartEvent = {"type": "http.response.start", "status": 204, "headers": headers}
        end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": b"", "more_body": False}
        await send(start)
        await send(end)

    @staticmethod
    def answering(origin: bytes | None, send: Send) -> Send:
        """``send``, adding to the response's start the CORS headers for an allowed ``origin``,
        and ``Vary: Origin`` to every answer (a shared cache must not hand one origin's answer
        to another)."""
        added = [(b"vary", b"origin")]
        if origin is not None:
            added += [(b"access-control-allow-origin", origin), (b"access-control-expose-headers", b"*")]

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *added]}
            await send(message)

        return send_with_cors
