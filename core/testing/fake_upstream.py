"""A fake OpenAI-compatible upstream (DeepSeek's dialect), served over real HTTP/1.1 on loopback.

Point a provider plugin at it to test the plugin offline, the way chatgate's own
``openai_compatible`` and ``deepseek`` providers are tested. Start it in a test,
give the provider ``fake.url`` as its base URL and ``fake.api_key`` as its key,
and choose how the next answers go with :class:`Scenario`::

    from core.testing.fake_upstream import FakeUpstream, Scenario

    async def test_my_provider_retries_a_429() -> None:
        async with FakeUpstream() as fake:
            fake.script(Scenario(status=429, retry_after="1"), Scenario(token_delay=0.01))
            provider = MyProvider("mine", MyProvider.Options(base_url=fake.url, api_key=fake.api_key))
            ...  # open it, stream a reply; fake.requests holds what it received

It serves ``POST /chat/completions`` (also under ``/v1``), ``GET /models`` and, playing a server that
has them (DeepSeek has none), ``POST /embeddings``. Asked for ``logprobs`` (outside thinking mode), it
sends deterministic per-token entries, ``top_logprobs`` alternatives each.
A :class:`Scenario` scripts errors (any HTTP status, with ``Retry-After``),
delays, keep-alive comments, stalls, cut or malformed streams, tool calls and
reasoning; ``fake.requests``, ``fake.active_streams`` and ``fake.disconnects``
show what the provider did. :class:`~core.testing.provider_suite.ProviderConformance`
run against it proves a plugin's failure handling: see
``tests/providers/test_deepseek.py``.

The fake is written on raw :func:`asyncio.start_server` rather than a web framework so that tests
control every byte on the wire: chunk framing, keep-alive comments, empty bodies, a stream cut without
its terminator, a stream that stalls. The shapes it sends are the ones captured from DeepSeek
(``shared/research/wire-formats.md``, §1): key order, delta shapes in and out of thinking mode,
usage riding on the ``finish_reason`` chunk, the error bodies and the ``x-ds-trace-id`` header.

Run it by hand (benchmarks, demos) and drive it through the ``/_fake/...`` control endpoints::

    python -m core.testing.fake_upstream --port 8600 --token-delay 0.02
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import faulthandler
import hashlib
import http
import itertools
import json
import math
import re
import secrets
import signal
import string
import struct
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from types import TracebackType
from typing import Any, Literal, NoReturn

import msgspec

DEFAULT_API_KEY = "sk-fake-0123456789abcdef"
DEFAULT_MODELS = (
    "deepseek-v4-flash",
    "deepseek-v4-pro",
    "deepseek-flash",
    "deepseek-chat",
    "deepseek-reasoner",
)
MAX_TOKENS_LIMIT = 384_000  # V4's documented ceiling (research §1.2)
DEFAULT_EMBEDDING_MODELS = ("text-embedding-fake",)
"""What ``/embeddings`` serves (DeepSeek has no embeddings: these play another OpenAI-compatible server)."""
EMBEDDING_DIMENSIONS = 64

KEEPALIVE_EVENT = b": keep-alive\n\n"
DONE_EVENT = b"data: [DONE]\n\n"
MALFORMED_EVENT = b'data: {"id": oops not json\n\n'
CHUNKED_END = b"0\r\n\r\n"

_HEAD_LIMIT = 64 * 1024
_BODY_LIMIT = 64 * 1024 * 1024
_READ_SIZE = 64 * 1024

# V4 role list, from an observed "unknown variant `developer`" error (decolua/9router#773).
_ROLES = ("system", "user", "assistant", "tool", "latest_reminder")
# A fixed fingerprint: real DeepSeek sends one 32-hex value for long stretches of time.
_FINGERPRINT = hashlib.md5(b"chatgate fake deepseek", usedforsecurity=False).hexdigest()
FINGERPRINT = _FINGERPRINT
"""The ``system_fingerprint`` the fake sends (unless a scenario says ``fingerprint=False``)."""
_DESERIALIZE = "Failed to deserialize the JSON body into the target type: "
_PARSE = "Failed to parse the request body as JSON: "
_BAD_AUTH_FORMAT = "Authentication Fails (auth header format should be Bearer sk-...)"
_REASONING_REQUIRED = "The `reasoning_content` in the thinking mode must be passed back to the API."

# Default message and `type` for each error status DeepSeek documents (research §1.8).
_ERRORS: dict[int, tuple[str, str]] = {
    400: ("Invalid Format", "invalid_request_error"),
    401: ("Authentication Fails (no such user)", "authentication_error"),
    402: ("Insufficient Balance", "unknown_error"),
    # 422: the documented name as message; the observed 422s were deserialisation errors of this type.
    422: ("Invalid Parameters", "invalid_request_error"),
    429: ("Rate Limit Reached", "rate_limit_error"),  # body not captured; modelled on the 4xx ones
    500: ("Server Error", "server_error"),  # body not captured; modelled on the 4xx ones
    503: ("Server Overloaded", "server_error"),  # body not captured; modelled on the 4xx ones
}


class ToolCallSpec(msgspec.Struct):
    """A tool call the fake answers with: the function name and its arguments as JSON text."""

    name: str
    arguments: str


class Scenario(msgspec.Struct, forbid_unknown_fields=True):
    """How the fake answers one chat request. The defaults give a normal, fast answer.

    Timeline of a streamed answer: ``delay`` → response headers → ``keepalives`` comments (each followed by
    ``keepalive_interval``) → ``first_token_delay`` → first delta event → ``token_delay`` before each further
    delta event → trailer usage chunk (if any) → ``data: [DONE]`` → chunk terminator.

    "Delta events" are the ``chat.completion.chunk`` events that carry a delta, counted from the first
    (role) one and including the ``finish_reason`` one; ``disconnect_after``, ``stall_after`` and
    ``malformed_after`` act right after that many have been sent (0: before the first one).

    A non-streamed answer sends its headers after ``delay``, then the ``keepalives`` blank lines, then
    waits the time the stream would have taken (``first_token_delay`` plus ``token_delay`` per further
    event) and sends the JSON. There ``disconnect_after`` (any value) sends half of the JSON and aborts,
    ``stall_after`` stalls before the JSON, and ``malformed_after`` replaces the JSON with broken text.

    Usage counts one completion token per reasoning, content or tool-call delta event, so the numbers add
    up to what was sent (unless ``completion_tokens`` says otherwise). ``ignore_max_tokens`` plays an
    upstream that sends its whole reply whatever ``max_tokens`` asked for.
    """

    # None: follow the request's "thinking" (absent: enabled, but disabled for the deepseek-chat alias).
    # The validation rules that depend on thinking mode follow this value too.
    thinking: bool | None = None
    content: str | None = None  # the reply; None: a deterministic one from the last user message
    reasoning: str | None = None  # thinking mode's reasoning; None: deterministic
    tokens: int = 24  # length of the generated reply, in delta events
    reasoning_tokens: int = 12  # length of the generated reasoning, in delta events
    tool_call: ToolCallSpec | None = None  # answer with this call (finish_reason "tool_calls"), no text
    keepalives: int = 0  # ": keep-alive" comments (streams) or blank lines (JSON) before the answer
    keepalive_interval: float = 0.0  # seconds after each keep-alive
    # Where usage goes: on the finish_reason chunk (DeepSeek), on an extra "choices": [] chunk after it
    # (OpenAI), or nowhere. The non-streamed answer carries it unless "absent".
    usage: Literal["final_chunk", "trailer_chunk", "absent"] = "final_chunk"
    status: int | None = None  # answer with this HTTP error status and DeepSeek's body for it
    message: str | None = None  # the error message, instead of the status's usual one
    # With ``status``: the message quotes the request's key, as some servers do: "full", or "masked"
    # like OpenAI's "Incorrect API key provided: sk-abc***wxyz" (the first 6 and last 4 characters).
    echo_key: Literal["full", "masked"] | None = None
    retry_after: str | None = None  # a Retry-After header on the error answer
    delay: float = 0.0  # seconds before the response headers (errors included)
    first_token_delay: float = 0.0  # seconds between the headers (and keep-alives) and the first event
    token_delay: float = 0.0  # seconds before each further delta event
    disconnect_after: int | None = None  # close the socket after this many delta events: no [DONE]
    stall_after: int | None = None  # send nothing more after this many delta events, until the client goes
    malformed_after: int | None = None  # after this many delta events, one event that is not JSON
    empty_body: bool = False  # HTTP 200, application/json, Content-Length: 0
    finish_reason: str | None = None  # instead of stop/length/tool_calls
    json_for_stream: bool = False  # answer a stream=true request with the non-streamed JSON
    ignore_max_tokens: bool = False  # a misbehaving upstream: the whole reply, whatever max_tokens says
    completion_tokens: int | None = None  # report this many completion tokens, not the count sent
    fingerprint: bool = True  # send system_fingerprint (DeepSeek always does; some servers never do)


class Received(msgspec.Struct):
    """One chat-completion request as the fake saw it (also the ones it rejected)."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # the decoded JSON, or None when the body was not JSON
    raw: bytes  # the request body as sent
    connection: int  # serial number (1, 2, ...) of the TCP connection it came on
    at: float  # time.monotonic() when the request was fully received


class _ClientGone(Exception):
    """The connection is gone (the client left, or the fake cut it): stop answering."""


class _BadRequest(Exception):
    """The bytes on the connection are not an HTTP/1.1 request we can answer."""


@dataclass
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool
    at: float


@dataclass(eq=False)  # identity semantics: connections live in a set
class _Connection:
    """One accepted TCP connection.

    A pump task owns the reader: it moves bytes into ``buffer`` and sets ``closed`` the moment the peer
    goes, which is how the fake notices a disconnect while it is sleeping between events instead of at
    its next write.
    """

    serial: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    buffer: bytearray = field(default_factory=bytearray)
    readable: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    busy: bool = False  # a chat answer is being waited on or written
    aborted: bool = False  # the fake cut the connection itself: not a client disconnect
    gone_noted: bool = False
    task: asyncio.Task[None] | None = None
    sleeper: asyncio.Future[None] | None = None  # the pause under way, which the pump cuts short

    async def read_until(self, separator: bytes, limit: int) -> bytes | None:
        """The bytes up to and including ``separator``; None if the peer closed first."""
        while True:
            end = self.buffer.find(separator)
            if end >= 0:
                end += len(separator)
                data = bytes(self.buffer[:end])
                del self.buffer[:end]
                return data
            if len(self.buffer) > limit:
                raise _BadRequest("request head too large")
            if self.closed.is_set():
                return None
            self.readable.clear()
            await self.readable.wait()

    async def read_exactly(self, size: int) -> bytes | None:
        while len(self.buffer) < size:
            if self.closed.is_set():
                return None
            self.readable.clear()
            await self.readable.wait()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data


@dataclass
class _Plan:
    """What one successful answer will contain, worked out before the first byte is sent."""

    model: str
    thinking: bool
    stream: bool
    include_usage: bool
    reasoning: list[str]
    content: list[str]
    tool_call: tuple[str, str, list[str]] | None  # id, name, argument pieces (as sent)
    finish_reason: str
    usage: dict[str, Any]
    logprobs: int | None = None  # the top_logprobs per token when logprobs were asked for
    fingerprint: str | None = _FINGERPRINT

    @property
    def delta_events(self) -> int:
        body = len(self.content) if self.tool_call is None else 1 + len(self.tool_call[2])
        return 2 + len(self.reasoning) + body  # the role event and the finish event around the text


class FakeUpstream:
    """An OpenAI-compatible server on loopback that answers exactly as DeepSeek's does on the wire.

    It serves ``POST /chat/completions`` and ``/v1/chat/completions``, ``GET /models`` and ``/v1/models``,
    and the control endpoints ``POST /_fake/scenario``, ``POST /_fake/script`` and ``GET /_fake/requests``.
    Connections are HTTP/1.1 keep-alive. Each chat request takes the next scripted :class:`Scenario`, or
    ``scenario`` when the script is empty; unless the scenario injects an error status, the request is
    validated the way DeepSeek does (key, JSON, model, messages, max_tokens, thinking-mode rules).

    What a test can observe: ``requests`` (every chat request, as received; only the last ``history``
    when that is set, as it is when the fake serves benchmarks by hand), ``connections`` (TCP
    connections accepted), ``active_streams`` (chat answers in progress, from the end of the request to
    the last byte or the cut) and ``disconnects`` (when a client went away while a chat answer was being
    waited on or written; noticed within milliseconds, even during a delay or a stall).
    """

    def __init__(
        self,
        *,
        api_key: str = DEFAULT_API_KEY,
        models: Sequence[str] = DEFAULT_MODELS,
        host: str = "127.0.0.1",
        port: int = 0,
        history: int | None = None,
        embedding_models: Sequence[str] = DEFAULT_EMBEDDING_MODELS,
    ) -> None:
        self.api_key = api_key
        self.models: tuple[str, ...] = tuple(models)
        self.embedding_models: tuple[str, ...] = tuple(embedding_models)
        self.embedding_requests: list[Received] = []
        """Every ``/embeddings`` request, as received (they are not in ``requests``)."""
        self.host = host
        self.port = port
        self.url = ""  # set by start()
        self.scenario = Scenario()
        self.responder: Callable[[Any], Scenario | None] | None = None
        """Picks the scenario from the request's JSON body (None: the script's or ``scenario``)."""
        # Bounded for long runs: a log of every request makes each full garbage collection walk
        # all of them, and at a benchmark's tens of thousands that pauses the fake ~90 ms at a time.
        self.requests: list[Received] = []
        self.history = history
        self.connections = 0
        self.active_streams = 0
        self.disconnects: list[float] = []
        self._script: deque[Scenario] = deque()
        self._server: asyncio.Server | None = None
        self._open: set[_Connection] = set()
        self._stopping = False
        self._disconnects_awaited = 0
        self._disconnect_event = asyncio.Event()
        self._crashes: list[Exception] = []

    # -- public API ----------------------------------------------------------------------------------

    def script(self, *scenarios: Scenario) -> None:
        """Queue scenarios: each chat request takes the next one; when they run out ``scenario`` applies."""
        self._script.extend(scenarios)

    async def wait_for_disconnect(self, timeout: float = 5.0) -> float:  # noqa: ASYNC109 - the agreed API
        """The time of the next client disconnect not yet returned by this method (waits for it)."""
        async with asyncio.timeout(timeout):
            while len(self.disconnects) <= self._disconnects_awaited:
                self._disconnect_event.clear()
                await self._disconnect_event.wait()
        at = self.disconnects[self._disconnects_awaited]
        self._disconnects_awaited += 1
        return at

    async def start(self) -> None:
        self._stopping = False
        # A large backlog: benchmarks open hundreds of connections at once.
        self._server = await asyncio.start_server(self._handle, self.host, self.port, backlog=1024)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"

    async def stop(self) -> None:
        """Close the listening socket and every open connection (idle keep-alive ones included).

        Raises RuntimeError if answering any request crashed the fake, so a bug in it cannot hide.
        """
        if self._server is None:
            return
        self._stopping = True
        self._server.close()
        # Aborting the transports is enough to end every handler: the pump sees the end of input, which
        # wakes any pause, stall or read. Cancelling the handler tasks instead makes Python 3.11's
        # start_server callback log a spurious CancelledError traceback.
        tasks = [conn.task for conn in self._open if conn.task is not None]
        for conn in list(self._open):
            conn.writer.transport.abort()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:  # should not happen; do not let stop() hang if it does
                task.cancel()
        await self._server.wait_closed()
        self._server = None
        if self._crashes:
            raise RuntimeError("the fake DeepSeek server failed while answering") from self._crashes[0]

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- connections ---------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = _Connection(self.connections, reader, writer, task=asyncio.current_task())
        self._open.add(conn)
        pump = asyncio.create_task(self._pump(conn))
        try:
            while True:
                try:
                    request = await self._read_request(conn)
                except _BadRequest as exc:
                    body = _error_body(f"Bad Request: {exc}", "invalid_request_error")
                    await self._send(conn, 400, [("Content-Type", "application/json")], body, keep=False)
                    break
                if request is None or not await self._dispatch(conn, request):
                    break
        except _ClientGone:
            pass
        except Exception as exc:  # a bug in the fake: cut the client off and make stop() report it
            self._crashes.append(exc)
            writer.transport.abort()
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            # Only now: stop() waits for the connections in this set, and must not return (letting the
            # test's event loop close) while this task still has a step to run.
            self._open.discard(conn)

    async def _pump(self, conn: _Connection) -> None:
        try:
            while data := await conn.reader.read(_READ_SIZE):
                conn.buffer += data
                conn.readable.set()
        except (ConnectionError, OSError):
            pass
        finally:
            conn.closed.set()
            conn.readable.set()
            if conn.sleeper is not None:
                _wake(conn.sleeper)
            self._note_gone(conn)

    def _note_gone(self, conn: _Connection) -> None:
        """Record a client disconnect, once, if it happened while a chat answer was under way."""
        if conn.busy and not conn.aborted and not conn.gone_noted and not self._stopping:
            conn.gone_noted = True
            self.disconnects.append(time.monotonic())
            self._disconnect_event.set()

    async def _read_request(self, conn: _Connection) -> _Request | None:
        head = await conn.read_until(b"\r\n\r\n", _HEAD_LIMIT)
        if head is None:
            return None
        lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")[:-2]
        parts = lines[0].split(" ") if lines else []
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest("malformed request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise _BadRequest("malformed header line")
            key = name.lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked(conn)
        else:
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                raise _BadRequest("bad Content-Length") from None
            if not 0 <= length <= _BODY_LIMIT:
                raise _BadRequest("bad Content-Length")
            body = await conn.read_exactly(length)
        if body is None:
            return None
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep_alive = "close" not in tokens if version == "HTTP/1.1" else "keep-alive" in tokens
        path = target.split("?", 1)[0]
        return _Request(method, path, headers, body, keep_alive, time.monotonic())

    async def _read_chunked(self, conn: _Connection) -> bytes | None:
        body = bytearray()
        while True:
            line = await conn.read_until(b"\r\n", _HEAD_LIMIT)
            if line is None:
                return None
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadRequest("bad chunk size") from None
            if size == 0:  # then optional trailer fields, up to an empty line; they are dropped
                while True:
                    line = await conn.read_until(b"\r\n", _HEAD_LIMIT)
                    if line is None:
                        return None
                    if line == b"\r\n":
                        return bytes(body)
            data = await conn.read_exactly(size + 2)
            if data is None:
                return None
            body += data[:-2]
            if len(body) > _BODY_LIMIT:
                raise _BadRequest("body too large")

    # -- writing -------------------------------------------------------------------------------------

    async def _write(self, conn: _Connection, data: bytes) -> None:
        if conn.closed.is_set():
            self._note_gone(conn)
            raise _ClientGone
        conn.writer.write(data)
        try:
            await conn.writer.drain()
        except ConnectionError:
            self._note_gone(conn)
            raise _ClientGone from None

    async def _pause(self, conn: _Connection, seconds: float) -> None:
        """Sleep, but wake up at once (and stop answering) if the client goes away meanwhile."""
        if conn.closed.is_set():
            raise _ClientGone
        if seconds <= 0:
            return
        # A bare future and timer rather than asyncio.timeout(): no cancellation and no exception on the
        # common path, which matters when hundreds of streams pause between every event.
        loop = asyncio.get_running_loop()
        conn.sleeper = sleeper = loop.create_future()
        timer = loop.call_later(seconds, _wake, sleeper)
        try:
            await sleeper
        finally:
            timer.cancel()
            conn.sleeper = None
        if conn.closed.is_set():
            raise _ClientGone

    async def _abort(self, conn: _Connection) -> NoReturn:
        """Cut the TCP connection mid-answer: what was written arrives, then the socket just closes.

        No chunk terminator and no ``[DONE]`` follow, so the client sees an incomplete body.
        """
        conn.aborted = True
        transport = conn.writer.transport
        # abort() drops whatever is still buffered; flush it first so the cut lands exactly where asked.
        transport.set_write_buffer_limits(high=0)
        with contextlib.suppress(ConnectionError):
            await conn.writer.drain()
        transport.abort()
        raise _ClientGone

    async def _send(
        self, conn: _Connection, status: int, headers: list[tuple[str, str]], body: bytes, *, keep: bool
    ) -> bool:
        """Send a whole answer with a Content-Length; return whether the connection stays open."""
        head = _head(status, [*headers, ("Content-Length", str(len(body)))], keep=keep)
        await self._write(conn, head + body)
        return keep

    async def _send_error(
        self,
        conn: _Connection,
        request: _Request,
        status: int,
        message: str | None = None,
        *,
        retry_after: str | None = None,
    ) -> bool:
        default_message, error_type = _ERRORS.get(status, (_reason(status), _fallback_type(status)))
        headers = [("Content-Type", "application/json")]
        if retry_after is not None:
            headers.append(("Retry-After", retry_after))
        body = _error_body(message or default_message, error_type)
        return await self._send(conn, status, headers, body, keep=request.keep_alive)

    # -- routing -------------------------------------------------------------------------------------

    async def _dispatch(self, conn: _Connection, request: _Request) -> bool:
        path, method = request.path, request.method
        if path in ("/chat/completions", "/v1/chat/completions"):
            if method != "POST":
                return await self._method_not_allowed(conn, request, "POST")
            return await self._chat(conn, request)
        if path in ("/embeddings", "/v1/embeddings"):
            if method != "POST":
                return await self._method_not_allowed(conn, request, "POST")
            return await self._embeddings(conn, request)
        if path in ("/models", "/v1/models"):
            if method != "GET":
                return await self._method_not_allowed(conn, request, "GET")
            if (failure := self._auth_failure(request.headers)) is not None:
                return await self._send_error(conn, request, 401, failure)
            listing = {"object": "list", "data": [_model_entry(m) for m in self.models]}
            return await self._json(conn, request, 200, listing)
        if path == "/_fake/scenario" and method == "POST":
            try:
                self.scenario = msgspec.json.decode(request.body, type=Scenario)
            except msgspec.DecodeError as exc:
                return await self._send_error(conn, request, 400, f"invalid scenario: {exc}")
            return await self._json(conn, request, 200, msgspec.to_builtins(self.scenario))
        if path == "/_fake/script" and method == "POST":
            try:
                scenarios = msgspec.json.decode(request.body, type=list[Scenario])
            except msgspec.DecodeError as exc:
                return await self._send_error(conn, request, 400, f"invalid script: {exc}")
            self.script(*scenarios)
            return await self._json(conn, request, 200, {"queued": len(self._script)})
        if path == "/_fake/requests" and method == "GET":
            return await self._json(conn, request, 200, [r.body for r in self.requests])
        return await self._send_error(conn, request, 404, "Not Found")

    async def _json(self, conn: _Connection, request: _Request, status: int, obj: Any) -> bool:
        body = msgspec.json.encode(obj)
        return await self._send(
            conn, status, [("Content-Type", "application/json")], body, keep=request.keep_alive
        )

    async def _method_not_allowed(self, conn: _Connection, request: _Request, allow: str) -> bool:
        body = _error_body("Method Not Allowed", "invalid_request_error")
        headers = [("Content-Type", "application/json"), ("Allow", allow)]
        return await self._send(conn, 405, headers, body, keep=request.keep_alive)

    # -- chat completions ----------------------------------------------------------------------------

    async def _chat(self, conn: _Connection, request: _Request) -> bool:
        # One chat request takes one scenario, whatever becomes of it, so a script stays predictable.
        scenario = self._script.popleft() if self._script else self.scenario
        body, syntax_error = _decode(request.body)
        if self.responder is not None and syntax_error is None:
            scenario = self.responder(body) or scenario
        if self.history is not None and len(self.requests) >= 2 * self.history:
            del self.requests[: -self.history]  # trimmed in batches: each trim copies what it keeps
        self.requests.append(
            Received(
                method=request.method,
                path=request.path,
                headers=request.headers,
                body=body,
                raw=request.body,
                connection=conn.serial,
                at=request.at,
            )
        )
        conn.busy = True
        self.active_streams += 1
        try:
            await self._pause(conn, scenario.delay)
            if scenario.status is not None:
                message = scenario.message
                if scenario.echo_key is not None:
                    key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                    shown = key if scenario.echo_key == "full" else f"{key[:6]}***{key[-4:]}"
                    message = f"{message or 'Incorrect API key provided'}: {shown}."
                return await self._send_error(
                    conn, request, scenario.status, message, retry_after=scenario.retry_after
                )
            if (failure := self._auth_failure(request.headers)) is not None:
                return await self._send_error(conn, request, 401, failure)
            if syntax_error is not None:
                return await self._send_error(conn, request, 400, _PARSE + syntax_error)
            thinking = False
            if (failure := _shape_error(body, request.body)) is None:
                thinking = _thinking(scenario, body)
                failure = self._rule_error(body, thinking)
            if failure is not None:
                return await self._send_error(conn, request, 400, failure)
            if scenario.empty_body:
                # The overload failure mode: 200, a JSON content type and nothing in it (research §1.8).
                return await self._send(
                    conn, 200, [("Content-Type", "application/json")], b"", keep=request.keep_alive
                )
            plan = _plan(scenario, body, thinking)
            if plan.stream and not scenario.json_for_stream:
                return await self._stream(conn, request, scenario, plan)
            return await self._answer_json(conn, request, scenario, plan)
        except _ClientGone:
            return False
        finally:
            conn.busy = False
            self.active_streams -= 1

    async def _embeddings(self, conn: _Connection, request: _Request) -> bool:
        """``POST /embeddings``, OpenAI's shape: deterministic unit vectors, floats or base64.

        It takes the next scenario like a chat request does; only ``status`` (with ``message``,
        ``retry_after``) and ``delay`` apply.
        """
        scenario = self._script.popleft() if self._script else self.scenario
        body, syntax_error = _decode(request.body)
        self.embedding_requests.append(
            Received(
                request.method, request.path, request.headers, body, request.body, conn.serial, request.at
            )
        )
        conn.busy = True
        try:
            await self._pause(conn, scenario.delay)
            if scenario.status is not None:
                return await self._send_error(
                    conn, request, scenario.status, scenario.message, retry_after=scenario.retry_after
                )
            if (failure := self._auth_failure(request.headers)) is not None:
                return await self._send_error(conn, request, 401, failure)
            if syntax_error is not None:
                return await self._send_error(conn, request, 400, _PARSE + syntax_error)
            if isinstance(failure := _embedding_error(body, self.embedding_models), str):
                return await self._send_error(conn, request, 400, failure)
            return await self._json(conn, request, 200, _embedding_answer(body))
        except _ClientGone:
            return False
        finally:
            conn.busy = False

    def _auth_failure(self, headers: dict[str, str]) -> str | None:
        value = headers.get("authorization")
        if value is None or not value.startswith("Bearer "):
            return _BAD_AUTH_FORMAT
        key = value.removeprefix("Bearer ").strip()
        if key != self.api_key:
            return f"Authentication Fails, Your api key: ****{key[-4:]} is invalid"
        return None

    def _rule_error(self, body: dict[str, Any], thinking: bool) -> str | None:
        """The checks DeepSeek makes once the body has the right shape; the first failing one's message."""
        if body["model"] not in self.models:
            return "Model Not Exist"
        messages: list[dict[str, Any]] = body["messages"]
        if not messages:
            return "Empty input messages"  # message not captured; the condition is documented (≥ 1)
        max_tokens = body.get("max_tokens")
        if max_tokens is not None and not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
            return f"Invalid max_tokens value, the valid range of max_tokens is [1, {MAX_TOKENS_LIMIT}]"
        if thinking and (body.get("logprobs") is True or body.get("top_logprobs") is not None):
            # The rule is documented (§1.10); the message was not captured.
            return "logprobs and top_logprobs are not supported in thinking mode"
        top = body.get("top_logprobs")
        if top is not None and not (isinstance(top, int) and not isinstance(top, bool) and 0 <= top <= 20):
            return "top_logprobs must be an integer from 0 to 20"  # documented bound; message not captured
        if thinking:
            # V4 (§1.11): once an assistant turn has called a tool, it and every later assistant turn
            # must carry reasoning_content back ("" is accepted); before that it is ignored.
            after_tool_call = False
            for message in messages:
                if message.get("role") != "assistant":
                    continue
                after_tool_call = after_tool_call or bool(message.get("tool_calls"))
                if after_tool_call and message.get("reasoning_content") is None:
                    return _REASONING_REQUIRED
        return None

    async def _stream(self, conn: _Connection, request: _Request, scenario: Scenario, plan: _Plan) -> bool:
        headers = [
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("Transfer-Encoding", "chunked"),
            ("Cache-Control", "no-cache"),
        ]
        await self._write(conn, _head(200, headers, keep=request.keep_alive))
        for _ in range(scenario.keepalives):
            await self._write(conn, _chunk(KEEPALIVE_EVENT))
            await self._pause(conn, scenario.keepalive_interval)

        response_id, created = str(uuid.uuid4()), int(time.time())
        deltas = _deltas(plan)
        trailer = plan.usage if scenario.usage == "trailer_chunk" else None
        for sent, delta in enumerate(deltas):
            await self._checkpoint(conn, scenario, sent)
            await self._pause(conn, scenario.first_token_delay if sent == 0 else scenario.token_delay)
            last = sent == len(deltas) - 1
            chunk: dict[str, Any] = {
                "id": response_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": plan.model,
                "system_fingerprint": plan.fingerprint,
                "choices": [
                    {
                        "index": 0,
                        "delta": delta,
                        "logprobs": _chunk_logprobs(plan, delta, sent),
                        "finish_reason": plan.finish_reason if last else None,
                    }
                ],
            }
            if plan.fingerprint is None:
                del chunk["system_fingerprint"]
            # DeepSeek puts usage on the finish_reason chunk whether or not include_usage was asked for;
            # include_usage only decides whether the other chunks carry "usage": null (research §1.6).
            if last and scenario.usage == "final_chunk":
                chunk["usage"] = plan.usage
            elif plan.include_usage:
                chunk["usage"] = None
            await self._write(conn, _chunk(b"data: " + msgspec.json.encode(chunk) + b"\n\n"))
        await self._checkpoint(conn, scenario, len(deltas))
        if trailer is not None:
            chunk = {
                "id": response_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": plan.model,
                "system_fingerprint": plan.fingerprint,
                "choices": [],
                "usage": trailer,
            }
            if plan.fingerprint is None:
                del chunk["system_fingerprint"]
            await self._write(conn, _chunk(b"data: " + msgspec.json.encode(chunk) + b"\n\n"))
        await self._write(conn, _chunk(DONE_EVENT) + CHUNKED_END)
        return request.keep_alive

    async def _checkpoint(self, conn: _Connection, scenario: Scenario, sent: int) -> None:
        """Apply the failure injections due after ``sent`` delta events."""
        if scenario.disconnect_after == sent:
            await self._abort(conn)
        if scenario.stall_after == sent:
            await conn.closed.wait()  # until the client gives up; the pump records when
            raise _ClientGone
        if scenario.malformed_after == sent:
            await self._write(conn, _chunk(MALFORMED_EVENT))

    async def _answer_json(
        self, conn: _Connection, request: _Request, scenario: Scenario, plan: _Plan
    ) -> bool:
        completion = _completion(plan, with_usage=scenario.usage != "absent")
        body = msgspec.json.encode(completion)
        if scenario.malformed_after is not None:
            body = MALFORMED_EVENT.removeprefix(b"data: ").rstrip(b"\n")
        # With keep-alive blank lines the body starts before the JSON exists (as for a queued request), so
        # its length is not known up front: that takes chunked encoding.
        chunked = scenario.keepalives > 0
        headers = [("Content-Type", "application/json")]
        headers.append(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(len(body))))
        await self._write(conn, _head(200, headers, keep=request.keep_alive))
        for _ in range(scenario.keepalives):
            await self._write(conn, _chunk(b"\n"))
            await self._pause(conn, scenario.keepalive_interval)
        if scenario.stall_after is not None:
            await conn.closed.wait()
            raise _ClientGone
        await self._pause(conn, scenario.first_token_delay + scenario.token_delay * (plan.delta_events - 1))
        if scenario.disconnect_after is not None:
            half = body[: len(body) // 2]
            await self._write(conn, _chunk(half) if chunked else half)
            await self._abort(conn)
        await self._write(conn, _chunk(body) + CHUNKED_END if chunked else body)
        return request.keep_alive


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# -- answers -----------------------------------------------------------------------------------------


def _plan(scenario: Scenario, body: dict[str, Any], thinking: bool) -> _Plan:
    """The answer's pieces, cut to ``max_tokens`` (finish_reason "length"), and the usage they make."""
    messages: list[dict[str, Any]] = body["messages"]
    prompt = _last_user_text(messages)
    if thinking:
        reasoning = (
            split_pieces(scenario.reasoning)
            if scenario.reasoning is not None
            else _generated(["The", " user", " wrote"], prompt, _REASONING_FILLER, scenario.reasoning_tokens)
        )
    else:
        reasoning = []
    content = (
        split_pieces(scenario.content)
        if scenario.content is not None
        else _generated(["You", " said"], prompt, _REPLY_FILLER, scenario.tokens)
    )
    max_tokens = None if scenario.ignore_max_tokens else body.get("max_tokens")
    budget = max_tokens if max_tokens is not None else math.inf
    truncated = False

    def take(pieces: list[str]) -> list[str]:
        nonlocal budget, truncated
        kept = pieces[: int(min(budget, len(pieces)))]
        truncated = truncated or len(kept) < len(pieces)
        budget -= len(kept)
        return kept

    reasoning = take(reasoning)
    tool_call: tuple[str, str, list[str]] | None = None
    if scenario.tool_call is not None:
        # The first fragment (id and name) costs a token like each argument piece does.
        fragments = take(["", *_argument_pieces(scenario.tool_call.arguments)])
        content = []
        if fragments:
            tool_call = (_tool_call_id(), scenario.tool_call.name, fragments[1:])
        finish_reason = "length" if truncated else "tool_calls"
    else:
        content = take(content)
        finish_reason = "length" if truncated else "stop"
    if scenario.finish_reason is not None:
        finish_reason = scenario.finish_reason

    prompt_tokens = estimate_prompt_tokens(messages)
    completion_tokens = len(reasoning) + (len(content) if tool_call is None else 1 + len(tool_call[2]))
    if scenario.completion_tokens is not None:
        completion_tokens = scenario.completion_tokens
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    if thinking:
        usage["completion_tokens_details"] = {"reasoning_tokens": len(reasoning)}
    usage["prompt_cache_hit_tokens"] = 0
    usage["prompt_cache_miss_tokens"] = prompt_tokens

    stream_options = body.get("stream_options")
    top = body.get("top_logprobs")
    return _Plan(
        model=body["model"],
        thinking=thinking,
        stream=body.get("stream") is True,
        include_usage=isinstance(stream_options, dict) and stream_options.get("include_usage") is True,
        reasoning=reasoning,
        content=content,
        tool_call=tool_call,
        finish_reason=finish_reason,
        usage=usage,
        logprobs=(top if isinstance(top, int) else 0) if body.get("logprobs") is True else None,
        fingerprint=_FINGERPRINT if scenario.fingerprint else None,
    )


def _deltas(plan: _Plan) -> list[dict[str, Any]]:
    """The delta of every chunk of a streamed answer, in DeepSeek's shapes (research §1.5)."""
    if plan.thinking:
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": None, "reasoning_content": ""}]
        deltas += [{"content": None, "reasoning_content": piece} for piece in plan.reasoning]
        deltas += [{"content": piece, "reasoning_content": None} for piece in plan.content]
        last: dict[str, Any] = {"content": "", "reasoning_content": None}
    else:
        deltas = [{"role": "assistant", "content": ""}]
        deltas += [{"content": piece} for piece in plan.content]
        last = {"content": ""}
    if plan.tool_call is not None:
        call_id, name, pieces = plan.tool_call
        function = {"name": name, "arguments": ""}
        deltas.append({"tool_calls": [{"index": 0, "id": call_id, "type": "function", "function": function}]})
        deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} for piece in pieces]
    # The closing delta of a tool-call stream was not captured; it is assumed to be the usual one.
    deltas.append(last)
    return deltas


def _completion(plan: _Plan, *, with_usage: bool) -> dict[str, Any]:
    """The non-streamed chat.completion object, keys in DeepSeek's order (research §1.3)."""
    message: dict[str, Any] = {"role": "assistant", "content": "".join(plan.content)}
    if plan.thinking:
        message["reasoning_content"] = "".join(plan.reasoning)
    if plan.tool_call is not None:
        call_id, name, pieces = plan.tool_call
        function = {"name": name, "arguments": "".join(pieces)}
        message["tool_calls"] = [{"index": 0, "id": call_id, "type": "function", "function": function}]
    completion: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": plan.model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": plan.finish_reason}],
    }
    if plan.logprobs is not None:
        entries = [_logprob_entry(piece, i, plan.logprobs) for i, piece in enumerate(plan.content)]
        completion["choices"][0]["logprobs"] = {"content": entries, "refusal": None}
    if with_usage:
        completion["usage"] = plan.usage
    if plan.fingerprint is not None:
        completion["system_fingerprint"] = plan.fingerprint
    return completion


def _logprob_entry(piece: str, position: int, top: int) -> dict[str, Any]:
    """A deterministic OpenAI-style logprob entry for the ``position``-th content piece."""
    digest = hashlib.sha256(f"{position}:{piece}".encode()).digest()
    logprob = -round(digest[0] / 255 * 2, 6)
    alternatives = [piece, *(f" alt{k}" for k in range(1, top))][:top]
    ranked = [
        {"token": alt, "logprob": round(logprob - 1.5 * rank, 6), "bytes": list(alt.encode())}
        for rank, alt in enumerate(alternatives)
    ]
    return {"token": piece, "logprob": logprob, "bytes": list(piece.encode()), "top_logprobs": ranked}


def _chunk_logprobs(plan: _Plan, delta: dict[str, Any], sent: int) -> dict[str, Any] | None:
    """A streamed chunk's ``logprobs``: its content piece's entry when they were asked for."""
    if plan.logprobs is None or not delta.get("content"):
        return None
    # The content pieces follow the role chunk and the reasoning ones.
    position = sent - 1 - len(plan.reasoning)
    return {"content": [_logprob_entry(delta["content"], position, plan.logprobs)], "refusal": None}


# Word pieces with their leading spaces, cycled to make a reply or reasoning of any length.
_REPLY_FILLER = (
    " and",
    " here",
    " is",
    " a",
    " calm",
    " deterministic",
    " answer",
    " from",
    " the",
    " fake.",
)
_REASONING_FILLER = (" so", " I", " should", " think", " it", " over", " step", " by", " step.")
_CJK = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
_PIECE = re.compile(rf"\s*(?:[{_CJK}]|[^\s{_CJK}]+)|\s+\Z")


def split_pieces(text: str) -> list[str]:
    """Split text into token-like pieces (a word with its leading space, or one CJK character).

    The pieces join back to ``text`` exactly.
    """
    return _PIECE.findall(text)


def _generated(opening: list[str], prompt: str, filler: Iterable[str], count: int) -> list[str]:
    words = [" " + w for w in prompt.split()[:8]]
    return list(itertools.islice(itertools.chain(opening, words, itertools.cycle(filler)), max(count, 0)))


def _argument_pieces(arguments: str) -> list[str]:
    # As in the captured stream, the first piece is the opening brace alone; the rest come a few at a time.
    if not arguments:
        return []
    return [arguments[:1]] + [arguments[i : i + 6] for i in range(1, len(arguments), 6)]


def _tool_call_id() -> str:
    alphabet = string.ascii_letters + string.digits
    return "call_00_" + "".join(secrets.choice(alphabet) for _ in range(24))


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def estimate_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """A deterministic prompt size: about four characters a token, at least one token a message."""
    total = 0
    for message in messages:
        text = _text_of(message.get("content"))
        if isinstance(message.get("reasoning_content"), str):
            text += message["reasoning_content"]
        if message.get("tool_calls"):
            text += json.dumps(message["tool_calls"])
        total += max(1, math.ceil(len(text) / 4))
    return total


def _thinking(scenario: Scenario, body: dict[str, Any]) -> bool:
    if scenario.thinking is not None:
        return scenario.thinking
    requested = body.get("thinking")
    if isinstance(requested, dict) and requested.get("type") in ("enabled", "disabled"):
        return bool(requested["type"] == "enabled")
    # V4 thinks by default; the legacy alias deepseek-chat meant deepseek-v4-flash with thinking off (§0.1).
    return bool(body["model"] != "deepseek-chat")


def _embedding_inputs(value: Any) -> list[Any] | None:
    """The inputs of an embeddings body (a string, strings, a token array, token arrays), or None."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [value]
        if all(isinstance(v, str) for v in value) or all(
            isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
            for v in value
        ):
            return list(value)
    return None


def _embedding_error(body: Any, models: Sequence[str]) -> str | None:
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return "model is required"
    if body["model"] not in models:
        return "Model Not Exist"
    if _embedding_inputs(body.get("input")) is None:
        return "input must be a string, an array of strings or an array of token arrays"
    if body.get("encoding_format", "float") not in ("float", "base64"):
        return "encoding_format must be float or base64"
    dimensions = body.get("dimensions")
    if dimensions is not None and not (
        isinstance(dimensions, int) and 1 <= dimensions <= EMBEDDING_DIMENSIONS
    ):
        return f"dimensions must be an integer from 1 to {EMBEDDING_DIMENSIONS}"
    return None


def _embedding_answer(body: dict[str, Any]) -> dict[str, Any]:
    inputs = _embedding_inputs(body["input"]) or []
    size = body.get("dimensions") or EMBEDDING_DIMENSIONS
    data = []
    tokens = 0
    for index, item in enumerate(inputs):
        digest = hashlib.sha256(json.dumps([body["model"], item]).encode()).digest()
        values = [(digest[i % 32] - 127.5) * (1 + i % 7) for i in range(size)]
        norm = math.sqrt(sum(v * v for v in values)) or 1.0
        vector = [v / norm for v in values]
        tokens += len(item) if isinstance(item, list) else max(1, math.ceil(len(item) / 4))
        embedding: Any = vector
        if body.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{size}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": body["model"], "usage": usage}


# -- request validation --------------------------------------------------------------------------------


def _decode(raw: bytes) -> tuple[Any, str | None]:
    """The JSON body, or None and a serde-style syntax error ("expected value at line 1 column 1")."""
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError:
        return None, "invalid unicode code point at line 1 column 1"
    except json.JSONDecodeError as exc:
        if not raw.strip():
            return None, "EOF while parsing a value at line 1 column 0"
        reason = {
            "Expecting value": "expected value",
            "Expecting property name enclosed in double quotes": "key must be a string",
            "Unterminated string starting at": "EOF while parsing a string",
            "Extra data": "trailing characters",
        }.get(exc.msg, exc.msg[:1].lower() + exc.msg[1:])
        return None, f"{reason} at line {exc.lineno} column {exc.colno}"


def _kind(value: Any) -> str:
    """How serde names a JSON value in an "invalid type" error."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f'string "{value}"'
    return "sequence" if isinstance(value, list) else "map"


def _shape_error(body: Any, raw: bytes) -> str | None:
    """A deserialisation error in DeepSeek's words, or None when the body has the expected shape.

    serde reports the position where it gave up; the fake does not track positions inside the document
    and always names its end, which is where serde reports missing fields anyway.
    """
    text = raw.decode("utf-8")
    where = f"at line {text.count(chr(10)) + 1} column {len(text.rsplit(chr(10), 1)[-1])}"

    def invalid(path: str, value: Any, expected: str) -> str:
        prefix = f"{path}: " if path else ""
        return f"{_DESERIALIZE}{prefix}invalid type: {_kind(value)}, expected {expected} {where}"

    if not isinstance(body, dict):
        return invalid("", body, "struct ChatCompletionRequest")
    for name in ("model", "messages"):
        if name not in body:
            return f"{_DESERIALIZE}missing field `{name}` {where}"
    if not isinstance(body["model"], str):
        return invalid("model", body["model"], "a string")
    if not isinstance(body["messages"], list):
        return invalid("messages", body["messages"], "a sequence")
    for i, message in enumerate(body["messages"]):
        if not isinstance(message, dict):
            return invalid(f"messages[{i}]", message, "internally tagged enum")
        role = message.get("role")
        if role is None:
            return f"{_DESERIALIZE}messages[{i}]: missing field `role` {where}"
        if role not in _ROLES:
            expected = ", ".join(f"`{r}`" for r in _ROLES)
            unknown = f"messages[{i}].role: unknown variant `{role}`, expected one of {expected}"
            return f"{_DESERIALIZE}{unknown} {where}"
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            return invalid(f"messages[{i}].content", content, "a string")
    for name, kinds, expected in (
        ("stream", (bool,), "a boolean"),
        ("max_tokens", (int,), "u32"),
        ("logprobs", (bool,), "a boolean"),
    ):
        value = body.get(name)
        if value is not None and (not isinstance(value, kinds) or (int in kinds and isinstance(value, bool))):
            return invalid(name, value, expected)
    thinking = body.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict):
            return invalid("thinking", thinking, "struct Thinking")
        if thinking.get("type") not in ("enabled", "disabled"):
            unknown = (
                f"thinking.type: unknown variant `{thinking.get('type')}`, expected `enabled` or `disabled`"
            )
            return f"{_DESERIALIZE}{unknown} {where}"
    return None


# -- HTTP framing -------------------------------------------------------------------------------------


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _fallback_type(status: int) -> str:
    return "server_error" if status >= 500 else "invalid_request_error"


def _head(status: int, headers: list[tuple[str, str]], *, keep: bool) -> bytes:
    """Status line and headers; every answer carries a trace id, as DeepSeek's do."""
    lines = [
        f"HTTP/1.1 {status} {_reason(status)}",
        f"Date: {formatdate(usegmt=True)}",
        "Server: CW",  # observed on DeepSeek's answers (research §1.1)
        *(f"{name}: {value}" for name, value in headers),
        f"Connection: {'keep-alive' if keep else 'close'}",
        f"x-ds-trace-id: {secrets.token_hex(16)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _chunk(data: bytes) -> bytes:
    """One chunk of a chunked body: hex size, CRLF, data, CRLF."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def _error_body(message: str, error_type: str) -> bytes:
    # DeepSeek's `code` is "invalid_request_error" on every error, 401 and 402 included (research §1.8).
    error = {"message": message, "type": error_type, "param": None, "code": "invalid_request_error"}
    return msgspec.json.encode({"error": error})


def _model_entry(model: str) -> dict[str, str]:
    return {"id": model, "object": "model", "owned_by": "deepseek"}  # no "created", as in §1.9


# -- by hand ------------------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    async with FakeUpstream(api_key=args.api_key, port=args.port, history=args.history) as fake:
        fake.scenario = Scenario(tokens=args.tokens, token_delay=args.token_delay)
        print(f"fake DeepSeek listening on {fake.url}", flush=True)
        await asyncio.Event().wait()  # until Ctrl-C cancels this task


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m core.testing.fake_upstream", description="A fake DeepSeek API."
    )
    parser.add_argument("--port", type=int, default=8600)
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between streamed events")
    parser.add_argument("--tokens", type=int, default=24, help="tokens in each generated reply")
    parser.add_argument(
        "--history", type=int, default=1000, help="chat requests kept for GET /_fake/requests (default 1000)"
    )
    args = parser.parse_args(argv)
    # SIGUSR1 prints every thread's stack to stderr: how a test shows where a hang is.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
