"""The pieces of a raw ASGI endpoint: read a request, answer it, without Litestar's objects.

A surface's busiest paths (a chat request in any dialect) skip Litestar's
request and response objects, whose signature parsing, header wrappers and
response building cost more CPU than the upstream call; they are mounted with
:meth:`~core.surface.Surface.direct_routes`. These helpers are what every such
endpoint needs, so each dialect answers with the same care: a body over the
limit is refused as soon as it is known, a client gone before its body arrived
ends the request quietly, a whole answer is one write.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import cast

import msgspec
from litestar.types import HTTPRequestEvent, Receive, Scope, Send

_encode = msgspec.json.Encoder().encode
_JSON = (b"content-type", b"application/json")

SSE_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: pass each event on at once
]
"""The response headers of a server-sent event stream."""


class Answer(msgspec.Struct, frozen=True):
    """A complete JSON answer: status, body and extra headers (transport-neutral, so a raw
    endpoint and a Litestar handler of one surface answer the same bytes)."""

    status: int
    body: bytes
    headers: dict[str, str] = {}


def json_answer(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    """``body`` encoded as JSON."""
    return Answer(status, _encode(body), headers or {})


class BodyTooLarge(Exception):
    """The request body is over the server's limit."""


class ClientGone(Exception):
    """The client left before its request was read."""


def request_headers(scope: Scope, wanted: Collection[bytes]) -> dict[str, str]:
    """The request headers named in ``wanted`` (lower-case bytes, as ASGI servers send names)."""
    pairs = scope["headers"]
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in pairs if name in wanted}


async def read_body(receive: Receive, limit: int, declared: str | None) -> bytes:
    """The whole request body, refused (:class:`BodyTooLarge`) as soon as it is known to pass ``limit``
    bytes; :class:`ClientGone` when the client disconnects first. ``declared`` is its Content-Length."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        request = cast("HTTPRequestEvent", message)  # an HTTP request receives nothing else
        chunk = request.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not request.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def encode_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """Response headers as ASGI wants them."""
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


async def send_answer(send: Send, answer: Answer) -> None:
    """A whole JSON answer: status line, headers and body, in one write."""
    headers = [_JSON, (b"content-length", str(len(answer.body)).encode()), *encode_headers(answer.headers)]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body, "more_body": False})


async def start_stream(send: Send, headers: dict[str, str]) -> None:
    """Begin a 200 server-sent event stream with ``headers`` added."""
    await send(
        {"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *encode_headers(headers)]}
    )
