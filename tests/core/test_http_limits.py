"""The HTTP layer bounds itself: header size and time, open connections, idle keep-alive.

Raw sockets play the misbehaving clients; every wait has a deadline and ends on a condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import httpx
import pytest

from core.http_server import MAX_HEADER_BYTES

HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closing, and
    so does a broken pipe: a close that lands while our own write is still going out)."""
    received = b""
    try:
        while chunk := await reader.read(65536):
            received += chunk
    except ConnectionError:
        pass
    return received


async def hold_slow_headers(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float]:
    """Open a connection and start headers that the trickle below never ends; when it opened."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HEAD + b"X-Slow: ")
    return reader, writer, time.monotonic()


async def trickle(writers: list[asyncio.StreamWriter], stop: asyncio.Event) -> None:
    """A header byte every 0.2 s on each connection still open, from one task (not one per
    connection: the test's own loop stays quiet while it times a request)."""
    while not stop.is_set():
        for writer in writers:
            if not writer.is_closing():
                writer.write(b"a")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


async def seconds_until_closed(reader: asyncio.StreamReader, started: float) -> tuple[float, bytes]:
    """Seconds from ``started`` until the server closes; what it sent meanwhile."""
    received = await read_until_closed(reader)
    return time.monotonic() - started, received


async def oversized_headers(port: int, size: int = 1 << 20) -> bytes:
    """Send ``size`` bytes of one header that never ends; what the server answers before closing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HEAD + b"X-Big: ")
    chunk = b"a" * 65536
    try:
        for _ in range(size // len(chunk)):
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass  # refused while still sending: the answer is read below
    answer = await read_until_closed(reader)
    writer.close()
    return answer


async def complete_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """Send one keep-alive GET /healthz and read its whole response; return its status line."""
    writer.write(HEAD + b"\r\n")
    return await read_response(reader)


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """Read one whole response; return its status line."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    return head.split(b"\r\n")[0]


async def test_slow_and_oversized_headers_are_cut_off_on_time_without_holding_memory(
    write_config, server_process
):
    timeout = 3  # long enough that all the attack is in place, and refused, while they are held
    config = write_config(
        replace={'host = "127.0.0.1"\n': f'host = "127.0.0.1"\nheader_timeout = {timeout}\n'}
    )
    url = server_process(config)
    pid = server_process.processes[url].pid
    port = port_of(url)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(20):  # warm up: what the first requests allocate is not the attack's
            assert (await client.get("/healthz")).status_code == 200
        before = rss_bytes(pid)

        slow = await asyncio.wait_for(asyncio.gather(*(hold_slow_headers(port) for _ in range(100))), 10)
        stop = asyncio.Event()
        writers = [writer for _, writer, _ in slow]
        trickling = asyncio.create_task(trickle(writers, stop))
        watchers = [asyncio.create_task(seconds_until_closed(reader, started)) for reader, _, started in slow]
        # The oversized ones are answered 431 first: the server accepts in order, so it has
        # taken in all 100 slow connections too, and is left with just them when timed.
        answers = await asyncio.wait_for(asyncio.gather(*(oversized_headers(port) for _ in range(10))), 15)
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        during = rss_bytes(pid)
        assert not any(watcher.done() for watcher in watchers), (
            "slow connections closed before the measurement"
        )

        async with httpx.AsyncClient(base_url=url, timeout=10) as fresh:  # a new connection, meanwhile
            started = time.monotonic()
            response = await fresh.get("/healthz")
            assert response.status_code == 200
            assert time.monotonic() - started < 1.0

        closed = await asyncio.wait_for(asyncio.gather(*watchers), 15)
        stop.set()
        await trickling
        for seconds, received in closed:
            assert received == b"", received  # closed without an answer
            assert timeout - 0.1 <= seconds < timeout + 5, seconds  # counted from connecting
        after = rss_bytes(pid)
        for writer in writers:
            writer.close()

        assert max(during, after) - before < 20 * 1024 * 1024, (before, during, after)
        assert (await client.get("/healthz")).status_code == 200


async def test_headers_up_to_the_limit_are_served_and_larger_answer_431(gateway):
    almost = "a" * (MAX_HEADER_BYTES - 1024)
    assert (await gateway.client.get("/healthz", headers={"X-Big": almost})).status_code == 200
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        response = await client.get("/healthz", headers={"X-Big": "a" * MAX_HEADER_BYTES})
    assert response.status_code == 431
    assert response.headers["connection"] == "close"
    # A body arriving with the headers in one read is the body, not more header.
    big_body = await gateway.client.post("/healthz", content=b"x" * 500_000)
    assert big_body.status_code == 405


async def test_a_kept_alive_connection_that_starts_a_request_must_finish_its_headers(
    write_config, gateway_factory
):
    gateway = await gateway_factory(
        write_config(
            replace={
                'host = "127.0.0.1"\n': 'host = "127.0.0.1"\nheader_timeout = 1\nkeepalive_timeout = 60\n'
            }
        )
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gateway.url))
    assert await complete_request(reader, writer) == b"HTTP/1.1 200 OK"
    started = time.monotonic()
    writer.write(b"GET /healthz HTTP/1.1\r\n")  # and nothing more
    assert await asyncio.wait_for(read_until_closed(reader), 10) == b""
    assert time.monotonic() - started >= 0.9  # closed by header_timeout, well before keepalive_timeout
    writer.close()


async def test_idle_keep_alive_connections_are_closed(write_config, gateway_factory):
    gateway = await gateway_factory(
        write_config(replace={'host = "127.0.0.1"\n': 'host = "127.0.0.1"\nkeepalive_timeout = 0.5\n'})
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gateway.url))
    for _ in range(2):  # kept alive between requests...
        assert await complete_request(reader, writer) == b"HTTP/1.1 200 OK"
    started = time.monotonic()
    assert await asyncio.wait_for(read_until_closed(reader), 10) == b""  # ...and closed when idle
    assert 0.4 <= time.monotonic() - started < 4  # keepalive_timeout, not uvicorn's default 5 s
    writer.close()


async def test_connections_past_max_connections_are_refused_at_once(write_config, gateway_factory):
    gateway = await gateway_factory(
        write_config(
            replace={
                'host = "127.0.0.1"\n': 'host = "127.0.0.1"\nmax_connections = 3\n'
                "header_timeout = 60\nkeepalive_timeout = 60\n"
            }
        )
    )
    held = []
    for _ in range(3):  # served, and kept open
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gateway.url))
        assert await complete_request(reader, writer) == b"HTTP/1.1 200 OK"
        held.append((reader, writer))

    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        started = time.monotonic()
        refused = await client.get("/healthz")
        assert refused.status_code == 503
        assert time.monotonic() - started < 1.0
        # The held connections are still served.
        assert await complete_request(*held[0]) == b"HTTP/1.1 200 OK"

        held.pop()[1].close()
        deadline = time.monotonic() + 10
        while (await client.get("/healthz")).status_code != 200:  # once the server saw the close
            assert time.monotonic() < deadline, "a freed connection slot was never reused"
            await asyncio.sleep(0.05)
    for _, writer in held:
        writer.close()


async def test_requests_split_across_reads_and_pipelined_requests_are_served(write_config, gateway_factory):
    gateway = await gateway_factory(
        write_config(replace={'host = "127.0.0.1"\n': 'host = "127.0.0.1"\nheader_timeout = 1\n'})
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gateway.url))
    for _ in range(2):  # the first request of a connection, then one on the kept-alive connection
        request = HEAD + b"\r\n"
        for start in range(0, len(request), 7):
            writer.write(request[start : start + 7])
            await writer.drain()
            await asyncio.sleep(0.01)
        assert await asyncio.wait_for(read_response(reader), 10) == b"HTTP/1.1 200 OK"
    writer.write((HEAD + b"\r\n") * 3)
    for _ in range(3):
        assert await asyncio.wait_for(read_response(reader), 10) == b"HTTP/1.1 200 OK"
    # Served requests leave no header timer behind: idle, the connection outlives header_timeout.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), 1.5)
    writer.close()


TOKEN = "limits-admin-token"
ADMIN = f'host = "127.0.0.1"\nadmin_token = "{TOKEN}"\nkeepalive_timeout = 60\n'


def admin_post(*, chunked: bool = False, length: int = 0, token: str | None = TOKEN) -> bytes:
    """The head of a POST /admin/api/users (a route that reads its whole body before answering)."""
    head = b"POST /admin/api/users HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    if token:
        head += f"authorization: Bearer {token}\r\n".encode()
    head += b"transfer-encoding: chunked\r\n" if chunked else b"content-length: %d\r\n" % length
    return head + b"\r\n"


def trailers(size: int) -> bytes:
    """The last chunk, then ``size`` bytes of trailer fields of 1 KiB, never ended."""
    field = b"X-Trailer: " + b"t" * 1011 + b"\r\n"
    return b"0\r\n" + field * (size // len(field))


async def send(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Send ``data`` in 64 KiB writes; a server that stops listening ends it."""
    try:
        for start in range(0, len(data), 65536):
            writer.write(data[start : start + 65536])
            await writer.drain()
    except ConnectionError:
        pass  # refused while still sending: the answer is read after


async def test_trailers_are_dropped_and_over_64_kib_answer_431_without_holding_memory(
    write_config, server_process
):
    url = server_process(write_config(replace={'host = "127.0.0.1"\n': ADMIN}))
    pid = server_process.processes[url].pid
    port = port_of(url)
    # Served: a body in 1-byte chunks (five times more framing than body, 600 KB of it) and a
    # few trailer fields, twice on one connection, so the budget is per request.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for n in range(2):
        body = b'{"email": "chunks%d@example.com"' % n + b" " * 100_000 + b"}"
        framed = b"".join(b"1\r\n%c\r\n" % byte for byte in body)
        writer.write(admin_post(chunked=True) + framed + b"0\r\nX-Checksum: 1\r\nX-Other: 2\r\n\r\n")
        assert await asyncio.wait_for(read_response(reader), 10) == b"HTTP/1.1 201 Created"
    writer.close()
    before = rss_bytes(pid)

    # 32 MiB of trailers after the body: 431, and the server kept none of them.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await send(writer, admin_post(chunked=True) + b'2\r\n{"\r\n' + trailers(32 << 20))
    answer = await asyncio.wait_for(read_until_closed(reader), 10)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert rss_bytes(pid) - before < 10 * 1024 * 1024, (before, rss_bytes(pid))
    writer.close()

    # Trailers past an answer already sent (the request refused before its body): closed.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(admin_post(chunked=True, token=None) + b'2\r\n{"\r\n')
    assert await asyncio.wait_for(read_response(reader), 10) == b"HTTP/1.1 401 Unauthorized"
    await send(writer, trailers(1 << 20))
    assert await asyncio.wait_for(read_until_closed(reader), 10) == b""  # long before keepalive_timeout
    writer.close()
    assert rss_bytes(pid) - before < 10 * 1024 * 1024, (before, rss_bytes(pid))


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_that_stops_arriving_is_closed_after_header_timeout(
    write_config, gateway_factory, chunked
):
    timeout = 2
    gateway = await gateway_factory(
        write_config(replace={'host = "127.0.0.1"\n': ADMIN + f"header_timeout = {timeout}\n"})
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gateway.url))
    body = b'{"email": "slow@example.com"}'
    writer.write(admin_post(chunked=chunked, length=len(body)) + (b"1d\r\n" if chunked else b"") + body[:2])
    started = time.monotonic()
    for byte in body[2:10]:  # a trickle longer than header_timeout keeps it open: each read counts
        await asyncio.sleep(timeout / 10)
        writer.write(bytes([byte]))
        await writer.drain()
    assert time.monotonic() - started > timeout * 0.75
    last = time.monotonic()
    # Then nothing: the application still waits for the rest, and the connection is closed.
    assert await asyncio.wait_for(read_until_closed(reader), 10) == b""
    assert timeout - 0.1 <= time.monotonic() - last < timeout + 3
    writer.close()
    # A whole body, or one that keeps coming, is served.
    assert (await gateway.client.get("/healthz")).status_code == 200
