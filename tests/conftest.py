"""Fixtures shared by the whole suite: configurations, and gateways served on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core import LedgerEntry
from core.app import create_app
from core.config import load_config
from core.testing.fake_upstream import FakeUpstream
from core.testing.gateway import RunningGateway, serving
from tests.postgres import postgres  # noqa: F401 - a fixture

BASE_CONFIG = """\
[server]
host = "127.0.0.1"

[generation]
flush_interval = 0.05
stale_after = 1

[store]
plugin = "sqlite"
path = "{db}"

[providers.mock]
first_token_delay = 0
token_delay = 0
models = ["mock-chat", "mock-reasoner"]
thinking_models = ["mock-reasoner"]

[models.mock-chat]
provider = "mock"
input_price = 1000
output_price = 2000
context_tokens = 4096
max_output_tokens = 512

[models.mock-reasoner]
provider = "mock"

[surfaces.openai_compat]
[surfaces.email_socket]
[surfaces.topic_chat]
"""


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a plugins.toml for this test: the base configuration, ``text`` appended, ``replace`` applied."""

    def write(text: str = "", *, replace: dict[str, str] | None = None, name: str = "plugins.toml") -> Path:
        body = BASE_CONFIG.format(db=tmp_path / "chatgate.db") + textwrap.dedent(text)
        for old, new in (replace or {}).items():
            assert old in body, old
            body = body.replace(old, new)
        path = tmp_path / name
        path.write_text(body)
        return path

    return write


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def settled(gateway: RunningGateway, user_id: int) -> list[LedgerEntry]:
    """The user's ledger once no reservation is left unsettled (answers do not wait for it)."""
    async with asyncio.timeout(30):  # a bound for a stuck settlement, not a timing expectation
        while True:
            entries = await gateway.services.billing.store.list_ledger(user_id)
            if not any(entry.kind == "reservation" for entry in entries):
                return entries
            await asyncio.sleep(0.02)


async def charges_settled(gateway: RunningGateway, user_id: int, count: int) -> list[LedgerEntry]:
    """The user's charges once at least ``count`` are posted and no reservation is left unsettled
    (settlement follows the answer closely, never before it)."""
    async with asyncio.timeout(30):  # a bound for a stuck settlement, not a timing expectation
        while True:
            entries = await gateway.services.billing.store.list_ledger(user_id)
            if not any(entry.kind == "reservation" for entry in entries):
                charges = [entry for entry in entries if entry.kind == "charge"]
                if len(charges) >= count:
                    return charges
            await asyncio.sleep(0.01)


async def funded_key(gateway: RunningGateway, email: str = "api@example.com") -> tuple[str, int]:
    """A new API key whose owner has 100 credits: its secret and the owner's id."""
    key, secret = await gateway.services.accounts.create_key(email)
    await gateway.services.billing.top_up(key.user_id, 100_000_000)
    return secret, key.user_id


@pytest.fixture
async def gateway_factory() -> AsyncIterator[Callable[..., object]]:
    """Start gateways for a config file; every one is shut down at the end of the test."""
    stack: list[tuple[object, httpx.AsyncClient]] = []

    async def start(config_path: Path, **kwargs: object) -> RunningGateway:
        app = create_app(load_config(config_path), **kwargs)  # type: ignore[arg-type]
        cm = serving(app)
        url = await cm.__aenter__()
        client = httpx.AsyncClient(base_url=url, timeout=10)
        stack.append((cm, client))
        return RunningGateway(url, app, client)

    yield start
    for cm, client in reversed(stack):
        await client.aclose()
        await cm.__aexit__(None, None, None)  # type: ignore[attr-defined]


@pytest.fixture
async def gateway(
    write_config: Callable[..., Path], gateway_factory: Callable[..., object]
) -> RunningGateway:
    """A gateway on the base test configuration."""
    return await gateway_factory(write_config())  # type: ignore[no-any-return,misc]


def chatgate(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, check: bool = False):
    """Run the installed ``chatgate`` command; return the completed process."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "core.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"chatgate {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


class Servers:
    """``chatgate serve`` processes: call it with a config to start one (its base URL once
    /healthz answers); ``stop(url)`` stops one gracefully (SIGTERM); the rest stop at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: list[Any] = []

    def __call__(self, config: Path, *extra: str, env: dict[str, str] | None = None) -> str:
        port = free_port()
        log = open(self.tmp_path / f"serve-{port}.log", "wb")  # noqa: SIM115 - closed at teardown
        self.logs.append(log)
        process = subprocess.Popen(
            [sys.executable, "-m", "core.cli", "serve", "--config", str(config), "--port", str(port), *extra],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=self.tmp_path,
        )
        url = f"http://127.0.0.1:{port}"
        self.processes[url] = process
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError((self.tmp_path / f"serve-{port}.log").read_text())
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("chatgate serve did not answer /healthz within 30 s")

    def stop(self, url: str) -> None:
        process = self.processes.pop(url)
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self) -> None:
        for url in list(self.processes):
            self.stop(url)
        for log in self.logs:
            log.close()


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Servers]:
    """Start ``chatgate serve`` as real processes (see :class:`Servers`)."""
    servers = Servers(tmp_path)
    yield servers
    servers.close()


FAKE_DEEPSEEK_KEY = "sk-fake-0123456789abcdef"


@pytest.fixture
async def fake_deepseek() -> AsyncIterator[FakeUpstream]:
    """A fake DeepSeek API on loopback (core/testing/fake_upstream.py), accepting ``FAKE_DEEPSEEK_KEY``."""
    async with FakeUpstream(api_key=FAKE_DEEPSEEK_KEY) as fake:
        yield fake


PRICED_MODELS = """
[models.deepseek-chat]
provider = "deepseek"
input_price = 1000
output_price = 2000
context_tokens = 65536
max_output_tokens = 4096

[models.deepseek-reasoner]
provider = "deepseek"
input_price = 1000
output_price = 2000
context_tokens = 65536
max_output_tokens = 4096
"""
"""The seeds' two DeepSeek model names, priced so every reply costs something visible."""


def deepseek_config(url: str, *, instance: str = "deepseek", extra: str = "") -> str:
    """A plugins.toml fragment: a ``deepseek`` instance at ``url`` serving the seeds' model names."""
    return f"""
[providers.{instance}]
plugin = "deepseek"
base_url = "{url}"
api_key = "{FAKE_DEEPSEEK_KEY}"
backoff = 0.01
{extra}

[providers.{instance}.aliases]
deepseek-chat = {{ model = "deepseek-v4-flash", extra_body = {{ thinking = {{ type = "disabled" }} }} }}
deepseek-reasoner = {{ model = "deepseek-v4-flash", extra_body = {{ thinking = {{ type = "enabled" }} }} }}
"""


ADMIN_TOKEN = "admin-token-for-tests-0123456789"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WITH_ADMIN = {'host = "127.0.0.1"\n': f'host = "127.0.0.1"\nadmin_token = "{ADMIN_TOKEN}"\n'}
"""``write_config(replace=WITH_ADMIN)``: the admin API on, and /healthz's details, for ``ADMIN_HEADERS``."""
