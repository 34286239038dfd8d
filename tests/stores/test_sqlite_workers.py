"""SQLite under ``chatgate serve --workers N``: no request fails on the file's lock, and
``chatgate check`` says where SQLite's single writer stops growing with workers."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import httpx
import pytest

from tests.conftest import chatgate, free_port

UNLIMITED = {
    # Only the lock is under test: no key or email limit may refuse a request of the burst.
    "[surfaces.openai_compat]\n": (
        "[surfaces.openai_compat]\nrequests_per_minute = 0\ntokens_per_minute = 0\nconcurrent_requests = 0\n"
    ),
    "[surfaces.email_socket]\n": "[surfaces.email_socket]\nrequests_per_minute = 0\ntokens_per_day = 0\n",
    # SQLite's own wait for its lock is a poll that lets a writer starve past any timeout
    # while other processes write (16 cores showed it at the default 5 s; 2 cores hardly do).
    # At 1 ms every such wait fails: chatgate's processes must queue on their lock file instead.
    'path = "': 'busy_timeout_ms = 1\npath = "',
}

WORKERS = 4
REQUESTS = 96  # of each kind, both kinds at once
CONCURRENCY = 24  # of each kind


@pytest.fixture
def cold_server(tmp_path: Path) -> Iterator[Callable[[Path], tuple[str, Path]]]:
    """``chatgate serve --workers 4`` started on a config; its URL and log, at once (no wait
    for /healthz: the first requests meet workers still opening the file)."""
    started: list[tuple[subprocess.Popen[bytes], BinaryIO]] = []

    def start(config: Path) -> tuple[str, Path]:
        port = free_port()
        log_path = tmp_path / f"serve-{port}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed at teardown
        command = ["serve", "--config", str(config), "--port", str(port), "--workers", str(WORKERS)]
        process = subprocess.Popen(
            [sys.executable, "-m", "core.cli", *command], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path
        )
        started.append((process, log))
        return f"http://127.0.0.1:{port}", log_path

    yield start
    for process, log in started:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


async def port_open(url: str) -> None:
    port = int(url.rsplit(":", 1)[1])
    async with asyncio.timeout(60):  # a bound for a server that never listens
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                await asyncio.sleep(0.02)


async def burst(
    url: str, send: Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]
) -> Counter[object]:
    """``REQUESTS`` requests, ``CONCURRENCY`` at a time; their statuses (or transport errors)."""
    statuses: Counter[object] = Counter()
    gate = asyncio.Semaphore(CONCURRENCY)
    # No keep-alive: a connection the server closes as idle just as it is reused fails the
    # request in the client, which is not what this test is about.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(i: int) -> None:
            async with gate:
                try:
                    answer = await send(client, i)
                    statuses[answer.status_code] += 1
                except httpx.TransportError as exc:
                    statuses[type(exc).__name__] += 1

        await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    return statuses


async def test_workers_starting_on_a_fresh_file_answer_every_request_of_a_burst(
    write_config: Callable[..., Path], cold_server: Callable[[Path], tuple[str, Path]], tmp_path: Path
) -> None:
    config = write_config(replace=UNLIMITED)
    assert not (tmp_path / "chatgate.db").exists()
    url, log = cold_server(config)
    # A fifth process opens the fresh file meanwhile: the key's owner and balance.
    create = ["keys", "create", "--email", "k@example.com", "--balance", "1000", "--config", str(config)]
    creating = asyncio.create_task(asyncio.to_thread(chatgate, *create))
    await port_open(url)

    async def email(client: httpx.AsyncClient, i: int) -> httpx.Response:
        # A new user, conversation, question, reply and ledger entry each: writes from every worker.
        return await client.post("/api/chat", json={"email": f"cold{i}@example.com", "inp": f"hi {i}"})

    async def keyed() -> Counter[object]:
        created = await creating
        assert created.returncode == 0, created.stdout + created.stderr
        secret = created.stdout.splitlines()[-1]
        body = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]}

        async def send(client: httpx.AsyncClient, i: int) -> httpx.Response:
            return await client.post("/v1/chat/completions", json=body, headers={"X-API-Key": secret})

        return await burst(url, send)

    emails, keys = await asyncio.gather(burst(url, email), keyed())
    assert (emails, keys) == ({200: REQUESTS}, {200: REQUESTS})
    async with asyncio.timeout(60):  # every worker opened the file (a bound, not an expectation)
        while log.read_text().count(" ready: store ") < WORKERS:  # noqa: ASYNC110 - another process's log
            await asyncio.sleep(0.05)
    text = log.read_text()
    assert "database is locked" not in text
    assert "Traceback" not in text


@pytest.mark.parametrize(
    ("workers", "store", "warned"),
    [
        (3, 'plugin = "sqlite"', True),
        (2, 'plugin = "sqlite"', False),
        (8, 'plugin = "postgres"\ndsn = "postgresql://chatgate@127.0.0.1/chatgate"', False),
    ],
)
def test_check_warns_that_sqlite_writes_do_not_grow_with_workers(
    write_config: Callable[..., Path], tmp_path: Path, workers: int, store: str, warned: bool
) -> None:
    sqlite_store = f'[store]\nplugin = "sqlite"\npath = "{tmp_path / "chatgate.db"}"\n'
    server = 'host = "127.0.0.1"\n'
    config = write_config(
        replace={server: f"{server}workers = {workers}\n", sqlite_store: f"[store]\n{store}\n"}
    )
    result = chatgate("check", "--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    found = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    if warned:
        assert found == [
            f"warning: [server] workers = {workers} on the sqlite store: SQLite lets one process write at "
            "a time, so writes (each chat turn, each charge) do not go faster with more workers (about "
            "20,000 a second in all, measured on 2 cores with 1 to 8 processes); for many workers or "
            'several instances use PostgreSQL ([store] plugin = "postgres")'
        ]
    else:
        assert found == []
