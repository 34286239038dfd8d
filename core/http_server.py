"""The HTTP server: uvicorn, with the limits a public server needs, in one place.

:func:`uvicorn_options` is what ``chatgate serve`` and the test suite's servers both run,
so the tests see production's settings. uvicorn (0.55) bounds idle keep-alive connections
(``timeout_keep_alive``) and can refuse excess requests (``limit_concurrency``), but its
httptools protocol neither caps the size of request headers (llhttp buffers a header of any
length) nor times out a client that never finishes sending them (slowloris), and its h11
protocol answers an oversized head with 400. Nor does it bound a request's trailer fields
(llhttp hands them to ``on_header``, which appends them to the running request's
``scope["headers"]``), or time out a body that stops arriving. :class:`HttpProtocol` adds all
of these to uvicorn's httptools protocol, and caps open connections.
"""

from __future__ import annotations

import asyncio
import functools
from asyncio import TimerHandle
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from .config import ServerConfig

MAX_HEADER_BYTES = 64 * 1024
"""Request line and headers together; larger answer 431 (nginx and Node allow 8 to 16 KiB for
one header line; 64 KiB leaves room for big cookies and tokens)."""
LINGER_SECONDS = 2.0
"""How long a refused connection is drained before it is closed regardless."""

TOO_LARGE_MESSAGE = b"Request header fields are larger than 64 KiB.\n"
HEADERS_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\n"
    b"content-length: %d\r\n"
    b"\r\n"
    b"%s" % (len(TOO_LARGE_MESSAGE), TOO_LARGE_MESSAGE)
)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, bounded.

    Promises, per connection: request headers (request line included) over
    :data:`MAX_HEADER_BYTES` are answered 431 and the connection closed, having buffered at
    most that much; a request whose headers are not complete ``header_timeout`` seconds after
    the connection opened (or after its first byte, on a kept-alive connection) is closed; a
    connection opened while ``max_connections`` others are open is answered 503 (uvicorn's
    ``limit_concurrency`` answer, ``connection: close``) as soon as its request headers are in.

    While a request's body is incomplete, a connection on which nothing arrives for
    ``header_timeout`` seconds is closed (unless the server itself has stopped reading it, or
    not yet asked for a ``100-continue`` body). Trailer fields of a chunked body are parsed and
    dropped, as RFC 9110 6.5.1 allows (uvicorn's ASGI has no request trailers: it appended them
    to a ``scope["headers"]`` the application was already using); more than
    :data:`MAX_HEADER_BYTES` of them, or of any bytes between two body bytes, is answered 431
    (closed, if an answer has begun).

    The work per request is a counter; a timer only where a request's head or body spans reads.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        header_timeout: float = 10.0,
        max_connections: int = 1000,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.reading_headers = True
        """Between a request's end (or the connection's start) and the next one's headers."""
        self.header_bytes = 0
        """Bytes read while ``reading_headers``: those of an unfinished request head."""
        self.headers_seen = 0
        self.header_timer: TimerHandle | None = None
        self.body_timer: TimerHandle | None = None
        """Armed while a request's body spans reads: it checks ``last_read``, not rearmed per read."""
        self.last_read = 0.0
        """When a read last arrived for an incomplete body (loop time)."""
        self.body_seen = False
        """Whether the read being parsed carried a body byte."""
        self.gap_bytes = 0
        """Bytes read since the last that carried a body byte: chunk framing and trailers."""
        self.trailer_bytes = 0
        """Size of the trailer fields of the current request."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.header_timer = self.loop.call_later(self.header_timeout, self.header_timed_out)
        if len(self.connections) > self.max_connections:  # this one included
            # uvicorn answers 503 when open connections reach limit_concurrency: for this
            # connection alone, they always have; connections already served stay served.
            self.limit_concurrency = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_timers()
        super().connection_lost(exc)

    def cancel_timers(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None

    def data_received(self, data: bytes) -> None:
        if not self.reading_headers:  # a body
            self.body_seen = False
            super().data_received(data)
            if not self.body_pending():
                return
            self.body_read()
            # A read without a body byte is framing or trailers. Counted by the read, a gap
            # can be undercounted by the read that ends the body (at most 256 KiB), never
            # overcounted: llhttp buffers neither chunk extensions nor, beyond this, trailers.
            self.gap_bytes = 0 if self.body_seen else self.gap_bytes + len(data)
            if self.gap_bytes > MAX_HEADER_BYTES or self.trailer_bytes > MAX_HEADER_BYTES:
                self.refuse_trailers()
            return
        budget = MAX_HEADER_BYTES - self.header_bytes
        self.header_bytes += len(data)
        if len(data) > budget:
            self.parse_within_budget(data, budget)
            return
        super().data_received(data)
        if self.body_pending():  # its body did not all come in this read
            self.body_read()
        elif self.reading_headers and self.header_bytes and self.header_timer is None:
            # A request began on a kept-alive connection and its headers did not all come in
            # this read. Only then is a timer armed: one per request costs ~2 us.
            self.header_timer = self.loop.call_later(self.header_timeout, self.header_timed_out)

    def body_pending(self) -> bool:
        """Whether a request's headers are in but not all its body, on a connection still served."""
        return not self.reading_headers and self.serving()

    def serving(self) -> bool:
        """Whether this protocol still serves its transport (not closed, refused or upgraded)."""
        return self.transport.get_protocol() is self and not self.transport.is_closing()

    def parse_within_budget(self, data: bytes, budget: int) -> None:
        """Parse no more than the header budget; if the headers have not ended by then, answer
        431 without reading further. Only reads that carry a body (or too much header) get here."""
        seen = self.headers_seen
        super().data_received(data[:budget])
        if not self.serving():
            return  # answered 400 for a malformed request, or upgraded
        if self.headers_seen == seen:
            self.refuse(HEADERS_TOO_LARGE)
        else:
            self.data_received(data[budget:])  # the body, or the next request's headers, counted anew

    # The parser calls these two per header and per read: the base class is called directly,
    # which costs a third of what super() does (~30 ns against ~100).
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.reading_headers:
            HttpToolsProtocol.on_header(self, name, value)
        else:  # a trailer field: counted and dropped
            self.trailer_bytes += len(name) + len(value) + 4

    def on_body(self, body: bytes) -> None:
        self.body_seen = True
        HttpToolsProtocol.on_body(self, body)

    def on_headers_complete(self) -> None:
        self.reading_headers = False
        self.headers_seen += 1
        self.gap_bytes = self.trailer_bytes = 0
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.reading_headers = True
        self.header_bytes = 0
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None
        super().on_message_complete()

    def body_read(self) -> None:
        """A read arrived, and the request's body is still incomplete: note when, and make sure
        one timer watches for the next."""
        self.last_read = self.loop.time()
        if self.body_timer is None:
            self.body_timer = self.loop.call_at(self.last_read + self.header_timeout, self.body_timed_out)

    def body_timed_out(self) -> None:
        self.body_timer = None
        if not self.body_pending():
            return
        now = self.loop.time()
        if self.flow.read_paused or self.cycle.waiting_for_100_continue:
            # The wait is the server's: it stopped reading (the application has not taken the
            # body read so far, or a pipelined request waits its turn) or has not asked for it.
            self.last_read = now
        if now < self.last_read + self.header_timeout:
            self.body_timer = self.loop.call_at(self.last_read + self.header_timeout, self.body_timed_out)
            return
        self.transport.close()  # silently, as for slow headers: an attacker's line would be a log flood

    def header_timed_out(self) -> None:
        self.header_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # a pipelined request is slow: close after this response
        elif not self.transport.is_closing():
            self.transport.close()

    def refuse(self, answer: bytes) -> None:
        """Send ``answer`` and close without parsing more of this connection."""
        self.logger.warning("Request headers over %d bytes: answered 431.", MAX_HEADER_BYTES)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cancel_timers()
            self.transport.close()  # a pipelined request: no answer can follow the one under way
            return
        self.answer_and_linger(answer)

    def refuse_trailers(self) -> None:
        """The request under way sent more than :data:`MAX_HEADER_BYTES` without a body byte:
        answer 431 if no answer has begun, else close."""
        self.logger.warning("Request trailers over %d bytes: refused.", MAX_HEADER_BYTES)
        cycle = self.cycle
        if cycle.response_started or self.pipeline:  # an answer is under way: none can follow
            self.cancel_timers()
            self.transport.close()
            return
        # The application sees the client gone (receive() answers http.disconnect) and writes
        # nothing more; the connection answers 431 in its place.
        cycle.disconnected = True
        cycle.message_event.set()
        self.answer_and_linger(HEADERS_TOO_LARGE)

    def answer_and_linger(self, answer: bytes) -> None:
        self.cancel_timers()
        self._unset_keepalive_if_required()
        self.connections.discard(self)  # no longer an HTTP connection: it is not waited for
        self.transport.write(answer)
        self.transport.set_protocol(Lingering(self.transport))
        self.parser = None  # type: ignore[assignment]


class Lingering(asyncio.Protocol):
    """A refused connection: drop what the client still sends, close once it has read the answer.

    Closing a socket that has unread data resets the connection, and a client still sending
    would then lose the answer: the answer is followed by end-of-stream, reading goes on,
    and the socket closes when the client closes its side, or after :data:`LINGER_SECONDS`.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        if not transport.is_reading():
            transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> None:
        return None  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()


def uvicorn_options(
    server: ServerConfig, *, host: str | None = None, port: int | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` serving with ``server``'s
    settings (``host`` and ``port`` override its own, as ``chatgate serve --host`` does)."""
    forwarded = server.forwarded_allow_ips
    return {
        "host": host or server.host,
        "port": server.port if port is None else port,
        # A partial, not a subclass made on the fly: worker processes receive it pickled.
        "http": functools.partial(
            HttpProtocol, header_timeout=server.header_timeout, max_connections=server.max_connections
        ),
        "timeout_keep_alive": server.keepalive_timeout,
        # uvicorn trusts X-Forwarded-For from 127.0.0.1 unless told otherwise: trust no proxy
        # unless the operator names one, so a client address is the peer's own.
        "proxy_headers": forwarded is not None,
        "forwarded_allow_ips": forwarded,
        "timeout_graceful_shutdown": server.shutdown_grace,
        "access_log": server.access_log,
    }
