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
from typing import Any, cast

import msgspec
from litestar import HttpMethod, post, route
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody, Schema
from litestar.types import ASGIApp, HTTPRequestEvent, Receive, Scope, Send

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


def documented_route(
    paths: str | list[str],
    app: ASGIApp,
    *,
    summary: str,
    description: str,
    tags: list[str],
    body: Schema | None = None,
) -> list[HTTPRouteHandler]:
    """A ``POST`` route of the router that hands the request to the raw ``app``, and says in the
    OpenAPI schema what it is.

    A direct route (:meth:`~core.surface.Surface.direct_routes`) is answered before the router
    and so is in no schema; mount this beside it, with the same app, so the schema lists the
    endpoint and a path the front door does not take exactly (a trailing slash) is answered the
    same way. ``body`` is the schema of the JSON request body (the app reads the body itself).
    """

    class Documented(Operation):
        def to_schema(self) -> dict[str, Any]:
            schema = super().to_schema()
            if body is not None:
                content = {"application/json": OpenAPIMediaType(schema=body)}
                schema["requestBody"] = RequestBody(content=content, required=True).to_schema()
            return schema

    # Returning an ASGI app makes Litestar call it with the request's own scope, receive and
    # send: the body is still unread, and the app answers every status itself (other methods
    # too, in its surface's error shape: they reach it through the second, undocumented route).
    @post(
        paths,
        summary=summary,
        description=description,
        tags=tags,
        operation_class=Documented,
        status_code=200,
    )
    async def forward() -> ASGIApp:
        return app

    @route(paths, http_method=OTHER_METHODS, include_in_schema=False, status_code=200)
    async def forward_others() -> ASGIApp:
        return app

    return [forward, forward_others]


OTHER_METHODS: list[HttpMethod] = [
    HttpMethod.GET,
    HttpMethod.HEAD,
    HttpMethod.PUT,
    HttpMethod.PATCH,
    HttpMethod.DELETE,
]
"""What a raw endpoint answers (405) besides ``POST`` through the router (OPTIONS is Litestar's own)."""
