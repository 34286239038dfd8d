"""Three ``chatgate serve`` instances on one PostgreSQL behind a real nginx, set up as docs/deploy.md says.

The nginx configuration and chatgate's ``[server]`` table are read from docs/deploy.md
and only their addresses and ports are filled in, so the page is what runs here. Needs
Debian's ``nginx`` (``.ci/run`` installs it and sets ``CHATGATE_REQUIRE_NGINX``, so CI
never skips) and the local PostgreSQL (``tests/postgres.py``). The last test restarts an instance as the
page's rolling restart says, and puts a new one in its place.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from core import ChatMessage, ChatRequest, ContentDelta
from providers.mock import MockOptions, MockProvider
from tests.conftest import BASE_CONFIG, Servers, chatgate, free_port
from tests.postgres import Database

DEPLOY = Path(__file__).parents[1] / "docs" / "deploy.md"
TOKEN_DELAY = 0.025
"""The mock's seconds between tokens: slow enough that a token-by-token stream is visible."""
CLIENT = "203.0.113.9"
"""A client's address as the load balancer in front of nginx reports it."""
CLAIMED = "198.51.100.66"
"""An address a client claims for itself in its own X-Forwarded-For."""


def nginx_binary() -> str | None:
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def fenced(language: str, containing: str) -> str:
    """The one ```language block of docs/deploy.md that contains ``containing``."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```", DEPLOY.read_text(), re.S | re.M)
    [block] = [b for b in blocks if containing in b]
    return str(block)


def instance_config(postgres: Database, directory: Path) -> Path:
    """The instances' plugins.toml: the page's ``[server]`` table on loopback, one PostgreSQL schema."""
    server = fenced("toml", "[server]")
    server = server.replace('host = "10.0.0.11"', 'host = "127.0.0.1"').replace("10.0.0.5", "127.0.0.1")
    server = server.replace("workers = 4", "workers = 1") + "access_log = true\n"
    assert 'forwarded_allow_ips = ["127.0.0.1"]' in server
    store = postgres.store_section(postgres.schema()) + "pool_size = 4\n"
    body = BASE_CONFIG.format(db="unused")
    for old, new in {
        '[server]\nhost = "127.0.0.1"\n': server,
        '[store]\nplugin = "sqlite"\npath = "unused"\n': store,
        "token_delay = 0\n": f"token_delay = {TOKEN_DELAY}\n",
        "[surfaces.email_socket]\n": '[surfaces.email_socket]\nallow = ["*@example.com"]\n',
    }.items():
        assert old in body, old
        body = body.replace(old, new)
    path = directory / "plugins.toml"
    path.write_text(body)
    return path


def nginx_config(directory: Path, instances: list[str], edge: int, behind: int, down: str = "") -> str:
    """nginx.conf: the page's upstream (``down`` marked so) and server, on ``edge``; the same
    server behind a load balancer (the page's real-IP lines, the balancer being this test) on ``behind``."""
    site = fenced("nginx", "upstream chatgate {")
    servers = re.findall(r"server 10\.0\.0\.\d+:8000", site)
    assert len(servers) == len(instances)
    for old, url in zip(servers, instances, strict=True):
        address = url.removeprefix("http://")
        site = site.replace(old, f"server {address}" + (" down" if url == down else ""), 1)
    upstream, server = site.split("\nserver {", 1)
    server = "server {" + server
    assert "listen 80;" in server
    real_ip = fenced("nginx", "set_real_ip_from").replace("10.0.0.2", "127.0.0.1")
    # The master runs as root in CI; its workers would then run as nobody, who cannot enter
    # pytest's temporary directories.
    user = "user root;" if os.geteuid() == 0 else ""
    at_edge = server.replace("listen 80;", f"listen 127.0.0.1:{edge};")
    behind_balancer = server.replace("listen 80;", f"listen 127.0.0.1:{behind};\n    {real_ip}")
    return f"""
{user}
worker_processes 1;  # one worker: one round-robin turn order
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {directory}/access.log;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    add_header X-Upstream $upstream_addr always;  # which instance answered
{upstream}
{at_edge}
{behind_balancer}
}}
"""


class Deployment:
    """Three instances (``instances``, their URLs) behind nginx, which answers at ``url`` as the
    edge proxy and at ``behind_url`` as a proxy behind a load balancer (it then believes the
    X-Forwarded-For a loopback caller sends)."""

    def __init__(self, nginx: str, directory: Path, servers: Servers, config: Path) -> None:
        self.directory = directory
        self.servers = servers
        self.config = config
        # Started together, as a deployment's instances may be: they queue for the migration.
        with ThreadPoolExecutor(3) as pool:
            self.instances = list(pool.map(lambda _: servers(config), range(3)))
        created = chatgate(
            "keys", "create", "--email", "proxy@example.com", "--balance", "100", "--config", str(config)
        )
        assert created.returncode == 0, created.stderr
        self.key = created.stdout.splitlines()[-1]
        self.edge, self.behind = free_port(), free_port()
        self.url, self.behind_url = f"http://127.0.0.1:{self.edge}", f"http://127.0.0.1:{self.behind}"
        self.conf = directory / "nginx.conf"
        self.error_log = directory / "error.log"
        self.nginx = [nginx, "-p", str(directory), "-c", str(self.conf), "-e", str(self.error_log)]
        self.conf.write_text(nginx_config(directory, self.instances, self.edge, self.behind))
        with open(directory / "nginx.out", "wb") as out:
            self.process = subprocess.Popen(
                [*self.nginx, "-g", "daemon off;"], stdout=out, stderr=subprocess.STDOUT
            )
        try:
            self.wait_listening()
        except AssertionError:
            self.close()
            raise

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def addresses(self) -> set[str]:
        return {url.removeprefix("http://") for url in self.instances}

    def wait_listening(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"nginx exited:\n{self.error_log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.edge), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"nginx did not listen within 10 s:\n{self.error_log.read_text()}")

    def reconfigure(self, down: str = "") -> None:
        """Write nginx.conf for ``instances`` (``down`` marked down) and ``nginx -s reload``; return
        once the old worker is shutting down: from then on only the new one accepts connections."""
        retired = self.error_log.read_text().count("gracefully shutting down")
        self.conf.write_text(nginx_config(self.directory, self.instances, self.edge, self.behind, down))
        reload = subprocess.run([*self.nginx, "-s", "reload"], capture_output=True, text=True, timeout=10)
        assert reload.returncode == 0, reload.stderr
        deadline = time.monotonic() + 10
        while self.error_log.read_text().count("gracefully shutting down") == retired:
            assert time.monotonic() < deadline, self.error_log.read_text()
            time.sleep(0.02)

    def logged_client(self, probe: str) -> str:
        """The client address an instance logged for the request whose path carries ``probe``
        (the line is written just after the answer, so it is waited for)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for log in self.directory.glob("serve-*.log"):
                for line in log.read_text().splitlines():
                    if probe in line:
                        return line.split(" - ", 1)[0].split()[-1].rsplit(":", 1)[0]
            time.sleep(0.05)
        raise AssertionError(f"no instance logged {probe}")

    def close(self) -> None:
        self.process.send_signal(signal.SIGQUIT)  # graceful: let open connections finish
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def deployment(postgres: Database, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    nginx = nginx_binary()
    if nginx is None:
        if os.environ.get("CHATGATE_REQUIRE_NGINX"):
            raise RuntimeError("nginx is required (CHATGATE_REQUIRE_NGINX is set) but not installed")
        pytest.skip("nginx is not installed (apt-get install nginx)")
    directory = tmp_path_factory.mktemp("nginx")
    servers = Servers(directory)
    try:
        deployment = Deployment(nginx, directory, servers, instance_config(postgres, directory))
        try:
            yield deployment
        finally:
            deployment.close()
    finally:
        servers.close()


def test_requests_take_turns_across_the_three_instances(deployment: Deployment) -> None:
    with httpx.Client(base_url=deployment.url, timeout=10) as client:
        answered = [client.get("/healthz").headers["X-Upstream"] for _ in range(6)]
    assert set(answered) == deployment.addresses()
    assert answered[3:] == answered[:3]  # strict turns while the instances are idle


def arrivals(chunks: Iterator[bytes]) -> list[tuple[float, bytes]]:
    """Each read of a body (``response.iter_raw()``) as it came off the socket, with the moment it came."""
    return [(time.monotonic(), chunk) for chunk in chunks]


def pieces(reads: list[tuple[float, bytes]]) -> list[str]:
    """The reply text of each SSE event of a streamed completion, in order; checks it ends with [DONE]."""
    text = b"".join(chunk for _, chunk in reads).decode()
    assert text.endswith("data: [DONE]\n\n"), text
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    return [event["choices"][0]["delta"].get("content") or "" for event in events if event["choices"]]


def moments(reads: list[tuple[float, bytes]]) -> list[float]:
    """The distinct moments data arrived: reads closer than 5 ms count as one."""
    times: list[float] = []
    for at, _ in reads:
        if not times or at - times[-1] > 0.005:
            times.append(at)
    return times


def test_a_streamed_completion_arrives_token_by_token_through_nginx(deployment: Deployment) -> None:
    body = {
        "model": "mock-chat",
        "messages": [{"role": "user", "content": "Tell me a long story"}],
        "stream": True,
    }
    with (
        httpx.Client(base_url=deployment.url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=body, headers=deployment.headers) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        reads = arrivals(response.iter_raw())
    tokens = sum(1 for piece in pieces(reads) if piece)
    assert tokens >= 20
    # Had nginx buffered the reply, it would have come in a read or two at the end.
    arrived = moments(reads)
    assert len(arrived) >= tokens // 2, (len(arrived), tokens)
    assert arrived[-1] - arrived[0] >= (tokens - 1) * TOKEN_DELAY / 2


def test_a_topic_chat_reply_arrives_token_by_token_through_nginx(deployment: Deployment) -> None:
    with httpx.Client(base_url=deployment.url, timeout=30, headers=deployment.headers) as client:
        topic = client.post("/chat/topic", json={"name": "through nginx", "seriesId": 1})
        assert topic.status_code in (200, 201), topic.text
        message = {"seriesId": 1, "modelId": 1, "message": "Tell me a long story"}
        with client.stream("POST", f"/chat/topic/{topic.json()['id']}/message", json=message) as response:
            assert response.status_code == 200
            reads = arrivals(response.iter_raw())
    reply, _, meta = b"".join(chunk for _, chunk in reads).decode().partition("¦")
    assert reply.startswith('You asked about "Tell me a long story"')
    assert '"assistantMsgId"' in meta
    arrived = moments(reads)
    assert len(arrived) >= 15, len(arrived)
    assert arrived[-1] - arrived[0] >= 15 * TOKEN_DELAY


def test_the_client_address_reaches_chatgate_through_nginx(deployment: Deployment) -> None:
    # At the edge, nginx replaces what the client claims with the address it connects from.
    probe = f"edge-{uuid.uuid4().hex}"
    response = httpx.get(f"{deployment.url}/healthz?probe={probe}", headers={"X-Forwarded-For": CLAIMED})
    assert response.status_code == 200
    assert deployment.logged_client(probe) == "127.0.0.1"
    # Behind a load balancer that appended the client's address, nginx takes the rightmost
    # address it does not trust, and chatgate, trusting nginx, logs that one.
    probe = f"behind-{uuid.uuid4().hex}"
    response = httpx.get(
        f"{deployment.behind_url}/healthz?probe={probe}", headers={"X-Forwarded-For": f"{CLAIMED}, {CLIENT}"}
    )
    assert response.status_code == 200
    assert deployment.logged_client(probe) == CLIENT


async def test_a_newer_chat_on_another_instance_interrupts_the_older(deployment: Deployment) -> None:
    email = f"{uuid.uuid4().hex[:12]}@example.com"
    async with httpx.AsyncClient(base_url=deployment.url, timeout=30) as client:

        async def record() -> dict[str, Any]:
            response = await client.post("/api/record", json={"email": email})
            assert response.status_code == 200, response.text
            return response.json()  # type: ignore[no-any-return]

        chat = {"email": email, "inp": "Tell me a long story"}
        first = asyncio.create_task(client.post("/api/chat", json=chat))
        async with asyncio.timeout(10):  # the partial reply, read through whichever instance
            while True:
                shown = await record()
                last = shown["text"][-1] if shown["text"] else {}
                if shown["code"] == 201 and last.get("role") == "ai" and len(last["content"].split()) >= 2:
                    break
                await asyncio.sleep(0.02)
        # The first chat holds its instance; least_conn sends the second to another one.
        second = await client.post("/api/chat", json={"email": email, "inp": "Stop, answer this instead"})
        older = await first
        assert older.headers["X-Upstream"] != second.headers["X-Upstream"]
        assert {older.headers["X-Upstream"], second.headers["X-Upstream"]} <= deployment.addresses()
        assert second.json() == {"status": True, "code": 200, "exit": 0}
        assert older.json() == {"status": True, "code": 200, "exit": 1}
        shown = await record()
    assert shown["code"] == 200
    assert [(e["role"], e.get("status")) for e in shown["text"]] == [
        ("user", None),
        ("ai", "interrupted"),
        ("user", None),
        ("ai", None),
    ]
    # What was said before the interrupt is kept, and it is less than the whole reply.
    partial, whole = shown["text"][1]["content"], await mock_reply("Tell me a long story")
    assert len(partial.split()) >= 2
    assert whole.startswith(partial)
    assert len(partial) < len(whole)


async def mock_reply(question: str) -> str:
    """The whole reply the mock gives to ``question`` alone (its replies are deterministic)."""
    mock = MockProvider("mock", MockOptions(first_token_delay=0, token_delay=0))
    request = ChatRequest(model="mock-chat", messages=(ChatMessage(role="user", content=question),))
    return "".join([event.text async for event in mock.stream(request) if isinstance(event, ContentDelta)])


def test_a_rolling_restart_lets_the_running_stream_finish(deployment: Deployment) -> None:
    """docs/deploy.md's rolling restart, for one instance, while a reply streams from it."""
    body = {
        "model": "mock-chat",
        "messages": [{"role": "user", "content": "Tell me a long story"}],
        "stream": True,
    }
    with (
        httpx.Client(base_url=deployment.url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=body, headers=deployment.headers) as response,
    ):
        assert response.status_code == 200
        leaving = "http://" + response.headers["X-Upstream"]
        chunks = response.iter_raw()
        reads = [(time.monotonic(), next(chunks))]  # it has begun
        # 1. Out of the proxy: marked down, nginx reloaded; the old nginx worker keeps this stream.
        deployment.reconfigure(down=leaving)
        # 2. SIGTERM: the instance stops listening and lets its open requests end.
        stopping = deployment.servers.processes[leaving]
        stopping.terminate()
        stopped_at = time.monotonic()
        for _ in range(4):  # new requests, each on a new connection, go to the others
            answer = httpx.get(deployment.url + "/healthz", timeout=10)
            assert answer.status_code == 200
            assert answer.headers["X-Upstream"] in deployment.addresses() - {leaving.removeprefix("http://")}
        reads += arrivals(chunks)
    assert "".join(pieces(reads)) == asyncio.run(mock_reply("Tell me a long story"))  # the whole reply
    assert len(moments([r for r in reads if r[0] > stopped_at])) >= 10  # most of it came after SIGTERM
    # uvicorn ends by raising the signal again once it has shut down gracefully.
    assert stopping.wait(timeout=15) in (0, -signal.SIGTERM)
    log = (deployment.directory / f"serve-{leaving.rsplit(':', 1)[1]}.log").read_text()
    assert "Waiting for connections to close" in log
    assert "Application shutdown complete" in log
    assert "timeout graceful shutdown exceeded" not in log
    # 3. and 4. Its replacement starts and takes its place in the upstream.
    deployment.servers.stop(leaving)
    deployment.instances[deployment.instances.index(leaving)] = deployment.servers(deployment.config)
    deployment.reconfigure()
    answered = {httpx.get(deployment.url + "/healthz", timeout=10).headers["X-Upstream"] for _ in range(3)}
    assert answered == deployment.addresses()
