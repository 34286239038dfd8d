"""The HTTP layer bounds itself: header size and time, open connections, idle keep-alive.

Raw sockets play the misbehaving clients; every wait has a deadline and ends on a condition.
"""

from __future__ import annotations

import asyncio
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
    """Everything the server sends until it closes the connection (a reset counts as closing)."""
    received = b""
    try:
        while chunk := await reader.read(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


async def slow_headers(port: int, opened: list[float]) -> tuple[float, bytes]:
    """Send headers a byte every 0.2 s, never ending them; seconds until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    opened.append(started)
    writer.write(HEAD + b"X-Slow: ")
    try:
        while True:
            try:
                received = await asyncio.wait_for(reader.read(65536), 0.2)
            except TimeoutError:
                writer.write(b"a")  # still open: one more byte, never the end of the headers
                continue
            return time.monotonic() - started, received  # b"" at end of stream
    except ConnectionResetError:
        return time.monotonic() - started, b""
    finally:
        writer.close()


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
    config = write_config(replace={'host = "127.0.0.1"\n': 'host = "127.0.0.1"\nheader_timeout = 1\n'})
    url = server_process(config)
    pid = server_process.processes[url].pid
    port = port_of(url)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(20):  # warm up: what the first requests allocate is not the attack's
            assert (await client.get("/healthz")).status_code == 200
        before = rss_bytes(pid)

        opened: list[float] = []
        slow = [asyncio.create_task(slow_headers(port, opened)) for _ in range(100)]
        big = [asyncio.create_task(oversized_headers(port)) for _ in range(10)]
        deadline = time.monotonic() + 10
        while len(opened) < 100:
            assert time.monotonic() < deadline, "could not open 100 connections"
            await asyncio.sleep(0.01)

        async with httpx.AsyncClient(base_url=url, timeout=10) as fresh:  # a new connection, meanwhile
            started = time.monotonic()
            response = await fresh.get("/healthz")
            assert response.status_code == 200
            assert time.monotonic() - started < 1.0

        answers = await asyncio.wait_for(asyncio.gather(*big), 15)
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        during = rss_bytes(pid)

        closed = await asyncio.wait_for(asyncio.gather(*slow), 15)
        for seconds, received in closed:
            assert received == b"", received  # closed without an answer
            assert 0.9 <= seconds < 6, seconds  # header_timeout = 1, counted from connecting
        after = rss_bytes(pid)

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
