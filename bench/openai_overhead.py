"""What chatgate adds on top of the upstream, measured the way clients see it.

Run: ``python bench/openai_overhead.py [--requests N] [--compare-litellm]``.

It starts the fake DeepSeek server (tests/fakes/deepseek.py) and ``chatgate
serve`` (one worker, an API key, billing and rate limits on) as child
processes, then sends the same chat requests straight to the upstream and
through chatgate, non-streaming and streaming, at concurrency 1, 16 and 64,
and prints requests per second, p50/p99 latency, the latency chatgate adds,
the time-to-first-token overhead, chatgate's peak RSS, and how long it takes
from start to its first answered request.

The load generator is a small keep-alive HTTP/1.1 client on raw sockets (one
connection per concurrent caller), so the client is not what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_KEY = "sk-bench-upstream-0123456789"
CONCURRENCY = (1, 16, 64)
REPLY_TOKENS = 24
BODY = {
    "model": "deepseek-chat",
    "messages": [{"role": "user", "content": "Say hello in a few words."}],
}
UPSTREAM_BODY = {**BODY, "model": "deepseek-v4-flash", "thinking": {"type": "disabled"}}

CONFIG = """
[server]
host = "127.0.0.1"
port = {port}
workers = 1

[generation]
flush_interval = 0.5
stale_after = 30

[store]
plugin = "sqlite"
path = "{db}"

[providers.deepseek]
plugin = "deepseek"
base_url = "{upstream}"
api_key = "{key}"
max_connections = 256

[providers.deepseek.aliases]
deepseek-chat = {{ model = "deepseek-v4-flash", extra_body = {{ thinking = {{ type = "disabled" }} }} }}

[models.deepseek-chat]
provider = "deepseek"
input_price = 0.3
output_price = 1.2

[surfaces.openai_compat]
requests_per_minute = 1000000
tokens_per_minute = 1000000000
concurrent_requests = 1000
"""


@dataclass
class Run:
    """Latencies (and times to first token) of one batch of requests."""

    latencies: list[float] = field(default_factory=list)
    first_tokens: list[float] = field(default_factory=list)
    wall: float = 0.0
    errors: int = 0

    def rps(self) -> float:
        return len(self.latencies) / self.wall if self.wall else 0.0

    def pct(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


class Connection:
    """One keep-alive HTTP/1.1 connection that posts JSON and reads whole (or streamed) answers."""

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str]) -> None:
        self.host, self.port, self.path, self.headers = host, port, path, headers
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> tuple[int, float | None]:
        """Send one request; return its status and the seconds to the first streamed token."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = f"POST {self.path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in self.headers.items()) + "\r\n"
        started = time.perf_counter()
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = None
        chunked = False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        first = None
        if length is not None:
            await self.reader.readexactly(length)
        elif chunked:
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readline()
                    break
                data = await self.reader.readexactly(size + 2)
                if first is None and b'"content":"' in data and b'"content":""' not in data:
                    first = time.perf_counter() - started
        return status, first

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def load(
    url: str, path: str, headers: dict[str, str], body: dict[str, object], concurrency: int, total: int
) -> Run:
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    run = Run()
    remaining = total

    async def caller() -> None:
        nonlocal remaining
        connection = Connection(host, int(port), path, {"Content-Type": "application/json", **headers})
        try:
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                status, first = await connection.post(payload)
                run.latencies.append(time.perf_counter() - started)
                if first is not None:
                    run.first_tokens.append(first)
                if status != 200:
                    run.errors += 1
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    run.wall = time.perf_counter() - started
    return run


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its children, in MB (Linux /proc)."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A child Python process, quiet, started from the repository root."""
    return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def create_key(env: dict[str, str]) -> str:
    """A funded key, made with the CLI as an operator would."""
    command = [sys.executable, "-m", "core.cli", "keys", "create", "--email", "bench@example.com"]
    created = subprocess.run(
        [*command, "--balance", "1000000000"], env=env, capture_output=True, text=True, check=True
    )
    return created.stdout.splitlines()[-1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(url: str, path: str, headers: dict[str, str], body: dict[str, object]) -> float:
    """Seconds until ``url`` answers a chat request with 200."""
    started = time.perf_counter()
    while time.perf_counter() - started < 60:
        try:
            run = await load(url, path, headers, body, 1, 1)
            if not run.errors:
                return time.perf_counter() - started
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            pass
        await asyncio.sleep(0.01)
    raise RuntimeError(f"{url} did not answer within 60 s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement (default 2000)")
    parser.add_argument(
        "--compare-litellm", action="store_true", help="also measure LiteLLM's proxy (not yet)"
    )
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="chatgate-bench-"))
    upstream_port, gateway_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    fake = spawn("-m", "tests.fakes.deepseek", "--port", str(upstream_port), "--api-key", UPSTREAM_KEY,
                 "--tokens", str(REPLY_TOKENS))  # fmt: skip
    upstream_headers = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
    await wait_for(upstream, "/chat/completions", upstream_headers, UPSTREAM_BODY)

    config = tmp / "plugins.toml"
    config.write_text(
        CONFIG.format(port=gateway_port, db=tmp / "bench.db", upstream=upstream, key=UPSTREAM_KEY)
    )
    env = {**os.environ, "CHATGATE_CONFIG": str(config)}
    key = create_key(env)
    gateway = f"http://127.0.0.1:{gateway_port}"
    started = time.perf_counter()
    server = spawn("-m", "core.cli", "serve", env=env)
    gateway_headers = {"Authorization": f"Bearer {key}"}
    await wait_for(gateway, "/v1/chat/completions", gateway_headers, BODY)
    start_seconds = time.perf_counter() - started
    peak = rss_mb(server.pid)

    rows = []
    try:
        for stream in (False, True):
            for concurrency in CONCURRENCY:
                body = {**BODY, "stream": stream}
                direct_body = {**UPSTREAM_BODY, "stream": stream}
                await load(
                    upstream, "/chat/completions", upstream_headers, direct_body, concurrency, 100
                )  # warm-up
                await load(gateway, "/v1/chat/completions", gateway_headers, body, concurrency, 100)
                direct = await load(
                    upstream, "/chat/completions", upstream_headers, direct_body, concurrency, args.requests
                )
                through = await load(
                    gateway, "/v1/chat/completions", gateway_headers, body, concurrency, args.requests
                )
                peak = max(peak, rss_mb(server.pid))
                rows.append((stream, concurrency, direct, through))
    finally:
        server.terminate()
        fake.terminate()
        server.wait(10)
        fake.wait(10)

    print(f"\nchatgate: one worker, SQLite, billing and rate limits on; {args.requests} requests per cell")
    print(f"start to first answered request: {start_seconds:.2f} s; peak RSS: {peak:.0f} MB\n")
    print(
        "| mode | conc | direct req/s | chatgate req/s | direct p50 ms | chatgate p50 ms | added p50 ms "
        "| direct p99 ms | chatgate p99 ms | TTFT overhead p50 ms | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for stream, concurrency, direct, through in rows:
        ttft = (
            f"{through.pct(through.first_tokens, 0.5) - direct.pct(direct.first_tokens, 0.5):.2f}"
            if stream
            else "-"
        )
        mode = "stream" if stream else "whole"
        print(
            f"| {mode} | {concurrency} | {direct.rps():,.0f} | {through.rps():,.0f} "
            f"| {direct.pct(direct.latencies, 0.5):.2f} | {through.pct(through.latencies, 0.5):.2f} "
            f"| {through.pct(through.latencies, 0.5) - direct.pct(direct.latencies, 0.5):.2f} "
            f"| {direct.pct(direct.latencies, 0.99):.2f} | {through.pct(through.latencies, 0.99):.2f} "
            f"| {ttft} | {direct.errors + through.errors} |"
        )
    if args.compare_litellm:
        print("\n--compare-litellm: not implemented yet (see bench/README.md)")


if __name__ == "__main__":
    asyncio.run(main())
