"""A streamed response for replies that outlive their request.

Litestar's ``Stream`` runs every response in an anyio task group with a
second task listening for the client to leave, so it can cancel the
iterator. A reply stream needs neither: the reply is a generation of its
own that goes on (and is stored) when the client leaves, and once the
connection is gone the server drops what is still sent. Without them a
streamed reply costs three tasks fewer, which matters at one reply per
conversation per turn.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import Any

from litestar import Response
from litestar.types import ASGIApp, Receive, Scope, Send

PACE = 0.015
"""Seconds between two writes of a streamed reply, at the least. Faster than a screen
refreshes (60 Hz is 16.7 ms), so nobody sees it; but when an upstream sends a token every
few milliseconds, each write carries several and the server makes a third of the writes
and wake-ups."""


class _Body:
    __slots__ = ("chunks", "headers")

    def __init__(self, chunks: AsyncIterable[bytes], headers: list[tuple[bytes, bytes]]) -> None:
        self.chunks = chunks
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        async for chunk in self.chunks:
            if chunk:  # an empty body message would end nothing but cost a write
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class ReplyStream(Response[None]):
    """``200`` with ``chunks`` sent as they come, unbuffered (also by proxies).

    Promises: each chunk is one write; the iterator is consumed to its end
    even if the client has left (what it produces then is dropped), so the
    code that produces it never sees a cancellation for a disconnect.
    """

    def __init__(self, chunks: AsyncIterable[bytes], media_type: str) -> None:
        super().__init__(None)
        self.chunks = chunks
        self.stream_headers = [
            (b"content-type", media_type.encode("latin-1")),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIApp:  # type: ignore[override]
        return _Body(self.chunks, self.stream_headers)
