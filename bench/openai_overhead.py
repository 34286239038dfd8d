"""What chatgate adds on top of the upstream, measured the way clients see it.

Run: ``python bench/openai_overhead.py [--requests N] [--compare-litellm]``.

It starts the fake DeepSeek server (core/testing/fake_upstream.py) and ``chatgate
serve`` (one worker, an API key, billing and rate limits on) as child
processes, then sends the same chat requests straight to the upstream and
through chatgate, non-streaming and streaming, at concurrency 1, 16 and 64,
and prints requests per second, p50/p99 latency, the latency chatgate adds,
the time-to-first-token overhead, CPU per request, peak RSS, and how long
it takes from start to its first answered request.

With ``--compare-litellm`` it also installs LiteLLM's proxy (pinned to
``LITELLM_VERSION``) into a virtualenv cached under
``~/.cache/chatgate-bench/``, runs it with one worker against the same
upstream and measures it in the same cells, interleaved with chatgate, and
prints chatgate against it and against the targets. LiteLLM runs with a
master key and no database, its cheapest setup: no per-key budgets or
spend logs, which chatgate keeps on.

The load generator is a small keep-alive HTTP/1.1 client on raw sockets (one
connection per concurrent caller), so the client is not what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_KEY = "sk-bench-upstream-0123456789"
CONCURRENCY = (1, 16, 64)
WARMUP = 200
"""Requests each measurement's callers send first, uncounted (see :func:`load`)."""
LITELLM_VERSION = "1.100.0"  # pinned; 1.82.7 and 1.82.8 were compromised releases
LITELLM_KEY = "sk-litellm-bench-master"
LITELLM_CONFIG = """
model_list:
  - model_name: deepseek-chat
    litellm_params:
      model: openai/deepseek-v4-flash
      api_base: {upstream}
      api_key: {key}
      extra_body:
        thinking:
          type: disabled
general_settings:
  master_key: {master}
litellm_settings:
  telemetry: false
"""
REPLY_TOKENS = 24
BODY: dict[str, object] = {
    "model": "deepseek-chat",
    "messages": [{"role": "user", "content": "Say hello in a few words."}],
}
UPSTREAM_BODY = {**BODY, "model": "deepseek-v4-flash", "thinking": {"type": "disabled"}}

GATEWAY = """
[server]
host = "127.0.0.1"
port = {port}
workers = 1

[store]
plugin = "sqlite"
path = "{db}"

[providers.deepseek]
plugin = "deepseek"
base_url = "{upstream}"
api_key = "{key}"

[providers.deepseek.aliases]
deepseek-chat = {{ model = "deepseek-v4-flash", extra_body = {{ thinking = {{ type = "disabled" }} }} }}
"""
"""What every benchmark's chatgate shares: one worker, SQLite, the fake upstream as DeepSeek.
Each benchmark appends its own [models] and [surfaces]."""

CONFIG = (
    GATEWAY
    + """
[models.deepseek-chat]
provider = "deepseek"
input_price = 0.3
output_price = 1.2

[surfaces.openai_compat]
requests_per_minute = 1000000
tokens_per_minute = 1000000000
concurrent_requests = 1000
"""
)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (seconds), in milliseconds."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


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
        return percentile(values, q)


_TEXT = re.compile(rb'"content":"[^"]')


def sse_token(data: bytes) -> bool:
    """Whether a chunk of an OpenAI-style stream carries reply text (a chunk may hold several
    events: the role's empty content and the first text, when they leave together)."""
    return _TEXT.search(data) is not None


class Connection:
    """One keep-alive HTTP/1.1 connection that posts JSON (or GETs) and reads whole (or streamed) answers."""

    def __init__(
        self, host: str, port: int, path: str, headers: dict[str, str], method: str = "POST"
    ) -> None:
        self.host, self.port, self.path, self.headers, self.method = host, port, path, headers, method
        self.is_token = sse_token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> tuple[int, float | None]:
        """Send one request; return its status and the seconds to the first streamed token."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = f"{self.method} {self.path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
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
                if first is None and self.is_token(data[:-2]):
                    first = time.perf_counter() - started
        return status, first

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def load(
    url: str,
    path: str,
    headers: dict[str, str],
    body: dict[str, object] | None,
    concurrency: int,
    total: int,
    spread: float = 0.0,
    warmup: int = 0,
) -> Run:
    """``total`` requests from ``concurrency`` keep-alive callers; a GET when ``body`` is None.

    With ``spread``, the callers start evenly over that many seconds instead of at once.
    With ``warmup``, the same callers first send that many requests, which are not counted:
    the measured ones find the connections open and the callers out of step, as in a
    server's steady state (otherwise the first ``concurrency`` requests, all connecting at
    the same instant, are the p99 at 64 callers).
    """
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode() if body is not None else b""
    method = "POST" if body is not None else "GET"
    run = Run()
    issued = 0
    measuring = 0.0

    async def caller(start: float) -> None:
        nonlocal issued, measuring
        connection = Connection(
            host, int(port), path, {"Content-Type": "application/json", **headers}, method
        )
        await asyncio.sleep(start)
        try:
            while issued < warmup + total:
                counted = issued >= warmup
                issued += 1
                started = time.perf_counter()
                if counted and not measuring:
                    measuring = started
                status, first = await connection.post(payload)
                if not counted:
                    continue
                run.latencies.append(time.perf_counter() - started)
                if first is not None:
                    run.first_tokens.append(first)
                if status != 200:
                    run.errors += 1
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(caller(spread * i / concurrency) for i in range(concurrency)))
    run.wall = time.perf_counter() - (measuring or started)
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


def spawn(
    *args: str, env: dict[str, str] | None = None, program: str = sys.executable
) -> subprocess.Popen[bytes]:
    """A child process (Python by default), quiet, started from the repository root."""
    return subprocess.Popen(
        [program, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` and its children that were waited for (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def litellm_program() -> str:
    """The ``litellm`` command of a cached virtualenv, installed on first use."""
    venv = Path.home() / ".cache" / "chatgate-bench" / f"litellm-{LITELLM_VERSION}"
    program = venv / "bin" / "litellm"
    if not program.exists():
        print(f"installing litellm[proxy]=={LITELLM_VERSION} into {venv} (once) ...", flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, f"litellm[proxy]=={LITELLM_VERSION}"], check=True)
    return str(program)


def create_key(env: dict[str, str]) -> str:
    """A funded key, made with the CLI as an operator would."""
    command = [sys.executable, "-m", "core.cli", "keys", "create", "--email", "bench@example.com"]
    created = subprocess.run(
        [*command, "--balance", "1000000000"], env=env, capture_output=True, text=True, check=True
    )
    return created.stdout.splitlines()[-1]


async def wait_healthy(url: str, seconds: float = 60) -> None:
    """Wait until chatgate at ``url`` answers ``/healthz``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if not (await load(url, "/healthz", {}, None, 1, 1)).errors:
                return
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"chatgate serve did not answer /healthz within {seconds:.0f} s")
        await asyncio.sleep(0.05)


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


@dataclass
class Target:
    """One server under measurement and how to call it."""

    name: str
    url: str
    path: str
    headers: dict[str, str]
    body: dict[str, object]
    process: subprocess.Popen[bytes] | None = None
    start_seconds: float = 0.0
    peak_rss: float = 0.0

    def sample_rss(self) -> None:
        if self.process is not None:
            self.peak_rss = max(self.peak_rss, rss_mb(self.process.pid))


@dataclass
class Cell:
    """One (mode, concurrency) measurement of every target, and their CPU per request."""

    stream: bool
    concurrency: int
    runs: dict[str, Run] = field(default_factory=dict)
    cpu_ms: dict[str, float] = field(default_factory=dict)


async def measure(targets: list[Target], stream: bool, concurrency: int, requests: int) -> Cell:
    cell = Cell(stream, concurrency)
    for target in targets:
        body = {**target.body, "stream": stream}
        before = cpu_seconds(target.process.pid) if target.process else 0.0
        cell.runs[target.name] = await load(
            target.url, target.path, target.headers, body, concurrency, requests, warmup=WARMUP
        )
        if target.process:
            spent = cpu_seconds(target.process.pid) - before
            cell.cpu_ms[target.name] = spent / (WARMUP + requests) * 1000
        target.sample_rss()
    return cell


async def start(target: Target, args: list[str], env: dict[str, str], program: str = sys.executable) -> None:
    started = time.perf_counter()
    target.process = spawn(*args, env=env, program=program)
    await wait_for(target.url, target.path, target.headers, target.body)
    target.start_seconds = time.perf_counter() - started
    target.sample_rss()


def stop(target: Target) -> None:
    if target.process is not None:
        target.process.terminate()
        try:
            target.process.wait(15)
        except subprocess.TimeoutExpired:
            target.process.kill()


def table(cells: list[Cell], gateways: list[str]) -> None:
    print(
        "| mode | conc | server | req/s | p50 ms | p99 ms | added p50 ms | TTFT overhead p50 ms "
        "| CPU ms/req | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cell in cells:
        direct = cell.runs["direct"]
        for name in ["direct", *gateways]:
            run = cell.runs[name]
            added = run.pct(run.latencies, 0.5) - direct.pct(direct.latencies, 0.5)
            ttft = run.pct(run.first_tokens, 0.5) - direct.pct(direct.first_tokens, 0.5)
            print(
                f"| {'stream' if cell.stream else 'whole'} | {cell.concurrency} | {name} | {run.rps():,.0f} "
                f"| {run.pct(run.latencies, 0.5):.2f} | {run.pct(run.latencies, 0.99):.2f} "
                f"| {'-' if name == 'direct' else f'{added:.2f}'} "
                f"| {'-' if name == 'direct' or not cell.stream else f'{ttft:.2f}'} "
                f"| {cell.cpu_ms.get(name, float('nan')):.2f} | {run.errors} |"
            )


def verdict(cells: list[Cell], chatgate: Target, litellm: Target | None) -> None:
    """chatgate against the targets of issue 4 (and against LiteLLM, when measured)."""
    print("\nTargets:")
    for cell in cells:
        if cell.concurrency == 1 and not cell.stream:
            run, direct = cell.runs["chatgate"], cell.runs["direct"]
            added = run.pct(run.latencies, 0.5) - direct.pct(direct.latencies, 0.5)
            print(f"- added p50 at concurrency 1 (whole): {added:.2f} ms (target < 1 ms)")
    print(f"- peak RSS: {chatgate.peak_rss:.0f} MB (target < 120 MB)")
    print(f"- start to first answered request: {chatgate.start_seconds:.2f} s (target < 1.5 s)")
    if litellm is None:
        return
    print(
        f"- LiteLLM {LITELLM_VERSION}: start {litellm.start_seconds:.2f} s, "
        f"peak RSS {litellm.peak_rss:.0f} MB"
    )
    for cell in cells:
        if cell.concurrency == 1:
            continue
        ours, theirs = cell.runs["chatgate"], cell.runs["litellm"]
        ratio = ours.rps() / theirs.rps() if theirs.rps() else float("inf")
        p99 = theirs.pct(theirs.latencies, 0.99) / ours.pct(ours.latencies, 0.99)
        mode = "stream" if cell.stream else "whole"
        print(
            f"- {mode} at {cell.concurrency}: {ratio:.1f}x LiteLLM's requests/s (target >= 20x), "
            f"p99 1/{p99:.1f} of LiteLLM's (target <= 1/20)"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement (default 2000)")
    parser.add_argument(
        "--compare-litellm",
        action="store_true",
        help=f"also measure LiteLLM's proxy {LITELLM_VERSION} (installed once into ~/.cache/chatgate-bench)",
    )
    args = parser.parse_args()
    program = litellm_program() if args.compare_litellm else None

    tmp = Path(tempfile.mkdtemp(prefix="chatgate-bench-"))
    upstream_port, gateway_port, litellm_port = free_port(), free_port(), free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    fake = spawn("-m", "core.testing.fake_upstream", "--port", str(upstream_port), "--api-key", UPSTREAM_KEY,
                 "--tokens", str(REPLY_TOKENS))  # fmt: skip
    direct = Target(
        "direct",
        upstream,
        "/chat/completions",
        {"Authorization": f"Bearer {UPSTREAM_KEY}"},
        UPSTREAM_BODY,
        fake,
    )
    await wait_for(direct.url, direct.path, direct.headers, direct.body)

    config = tmp / "plugins.toml"
    config.write_text(
        CONFIG.format(port=gateway_port, db=tmp / "bench.db", upstream=upstream, key=UPSTREAM_KEY)
    )
    env = {**os.environ, "CHATGATE_CONFIG": str(config)}
    key = create_key(env)
    chatgate = Target(
        "chatgate", f"http://127.0.0.1:{gateway_port}", "/v1/chat/completions",
        {"Authorization": f"Bearer {key}"}, BODY,
    )  # fmt: skip
    targets = [direct, chatgate]
    litellm = None
    try:
        await start(chatgate, ["-m", "core.cli", "serve"], env)
        if program is not None:
            (tmp / "litellm.yaml").write_text(
                LITELLM_CONFIG.format(upstream=upstream, key=UPSTREAM_KEY, master=LITELLM_KEY)
            )
            litellm = Target(
                "litellm", f"http://127.0.0.1:{litellm_port}", "/v1/chat/completions",
                {"Authorization": f"Bearer {LITELLM_KEY}"}, BODY,
            )  # fmt: skip
            # The price list ships in the package; do not wait for a download that cannot happen.
            litellm_env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
            litellm_args = ["--config", str(tmp / "litellm.yaml"), "--host", "127.0.0.1",
                            "--port", str(litellm_port), "--num_workers", "1"]  # fmt: skip
            await start(litellm, litellm_args, litellm_env, program)
            targets.append(litellm)
        cells = []
        for stream in (False, True):
            for concurrency in CONCURRENCY:
                cells.append(await measure(targets, stream, concurrency, args.requests))
    finally:
        for target in reversed(targets):
            stop(target)

    gateways = [t.name for t in targets[1:]]
    print(
        "\nOne worker each; chatgate with SQLite, billing and rate limits on; "
        f"{args.requests} requests per cell"
    )
    for target in targets[1:]:
        print(
            f"{target.name}: start to first answered request {target.start_seconds:.2f} s, "
            f"peak RSS {target.peak_rss:.0f} MB"
        )
    print()
    table(cells, gateways)
    verdict(cells, chatgate, litellm)


if __name__ == "__main__":
    asyncio.run(main())
