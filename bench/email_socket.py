"""How fast the email-socket surface interrupts, and how fast it serves a long record.

Run: ``python bench/email_socket.py [--interrupts N] [--requests N]``.

It runs the fake DeepSeek server (core/testing/fake_upstream.py) in this process,
so its clock is the one the client reads, and ``chatgate serve`` (one
worker, SQLite) as a child process, then prints:

- interrupt latency p50/p99: from the moment a newer ``/api/chat`` for the
  same email is sent to the moment the fake upstream sees the older reply's
  connection closed (target: p99 under 50 ms);
- ``/api/record`` requests per second for a conversation of 1,000 messages,
  against ``/healthz`` requests per second on the same server, at the same
  concurrency (target: at least a tenth of the ``/healthz`` rate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from openai_overhead import (
    GATEWAY,
    ROOT,
    UPSTREAM_KEY,
    Connection,
    Run,
    cpu_seconds,
    free_port,
    load,
    percentile,
    spawn,
    wait_healthy,
)

sys.path.insert(0, str(ROOT))
from core.testing.fake_upstream import FakeUpstream, Scenario

CONFIG = (
    GATEWAY
    + """
[models.deepseek-chat]
provider = "deepseek"
context_tokens = 4000000            # the whole 1,000-message conversation goes up: no summaries here
max_output_tokens = 4096

[surfaces.email_socket]
model = "deepseek-chat"
requests_per_minute = 0             # the per-email quotas would stop the rounds
tokens_per_day = 0
"""
)
RECORD_MESSAGES = 1000
CONCURRENCY = 16


async def chat(connection: Connection, email: str, text: str) -> int:
    status, _ = await connection.post(json.dumps({"email": email, "inp": text}).encode())
    return status


async def wait_until(predicate: object, what: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def interrupts(
    fake: FakeUpstream,
    url: str,
    count: int,
    newer_url: str | None = None,
    token_delay: float = 0.002,
    streaming: float = 0.02,
) -> list[float]:
    """Seconds from each newer request's send to the upstream seeing the older reply's connection close.

    The older request goes to ``url``, the newer one to ``newer_url`` (another process on the same
    store; default the same server). The older reply's tokens come ``token_delay`` apart and flow for
    ``streaming`` seconds before the newer request is sent.
    """
    headers = {"Content-Type": "application/json"}
    host, port = url.removeprefix("http://").split(":")
    older = Connection(host, int(port), "/api/chat", headers)
    host, port = (newer_url or url).removeprefix("http://").split(":")
    newer = Connection(host, int(port), "/api/chat", headers)
    latencies = []
    for i in range(count):
        fake.script(Scenario(tokens=100_000, token_delay=token_delay), Scenario(tokens=4))
        asked = len(fake.requests)
        running = asyncio.create_task(chat(older, "interrupt@bench.example", f"tell a long story {i}"))
        await wait_until(lambda asked=asked: len(fake.requests) > asked, "the long reply to start")
        await asyncio.sleep(streaming)  # let tokens flow
        sent = time.monotonic()
        interrupting = asyncio.create_task(chat(newer, "interrupt@bench.example", f"stop {i}"))
        closed = await fake.wait_for_disconnect(10)
        latencies.append(closed - sent)
        statuses = await asyncio.gather(running, interrupting)
        if statuses != [200, 200]:
            raise RuntimeError(f"an interrupt round answered {statuses}")
    await older.close()
    await newer.close()
    return latencies


async def build_record(fake: FakeUpstream, url: str, email: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    connection = Connection(host, int(port), "/api/chat", {"Content-Type": "application/json"})
    fake.scenario = Scenario(tokens=24)
    for turn in range(RECORD_MESSAGES // 2):
        status = await chat(connection, email, f"Message number {turn}: tell me something about it.")
        if status != 200:
            raise RuntimeError(f"building the record: /api/chat answered {status}")
    await connection.close()


def row(name: str, run: Run, cpu: float) -> str:
    return (
        f"| {name} | {run.rps():,.0f} | {run.pct(run.latencies, 0.5):.2f} | "
        f"{run.pct(run.latencies, 0.99):.2f} | {cpu:.2f} | {run.errors} |"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interrupts", type=int, default=200, help="interrupt rounds (default 200)")
    parser.add_argument(
        "--requests", type=int, default=2000, help="requests per throughput cell (default 2000)"
    )
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="chatgate-bench-email-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with FakeUpstream(api_key=UPSTREAM_KEY) as fake:
        config = tmp / "plugins.toml"
        config.write_text(CONFIG.format(port=port, db=tmp / "bench.db", upstream=fake.url, key=UPSTREAM_KEY))
        server = spawn("-m", "core.cli", "serve", env={**os.environ, "CHATGATE_CONFIG": str(config)})
        try:
            await wait_healthy(url)

            await interrupts(fake, url, 10)  # warm-up
            latencies = await interrupts(fake, url, args.interrupts)

            await build_record(fake, url, "record@bench.example")
            record_body = {"email": "record@bench.example"}
            await load(url, "/api/record", {}, record_body, CONCURRENCY, 100)  # warm-up
            await load(url, "/healthz", {}, None, CONCURRENCY, 100)
            cells = []
            for name, path, body in (
                ("/healthz", "/healthz", None),
                ("/api/record", "/api/record", record_body),
            ):
                before = cpu_seconds(server.pid)
                run = await load(url, path, {}, body, CONCURRENCY, args.requests)
                cells.append((name, run, (cpu_seconds(server.pid) - before) / args.requests * 1000))
        finally:
            server.terminate()
            server.wait(10)

    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    print(
        f"\nInterrupts ({args.interrupts} rounds): newer /api/chat sent -> older upstream connection closed"
    )
    print(f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {max(latencies) * 1000:.2f} ms")
    print(f"\nConcurrency {CONCURRENCY}, {args.requests} requests each; record: {RECORD_MESSAGES} messages")
    print("| path | req/s | p50 ms | p99 ms | server CPU ms/req | errors |")
    print("|---|---|---|---|---|---|")
    for name, run, cpu in cells:
        print(row(name, run, cpu))
    ratio = cells[1][1].rps() / cells[0][1].rps()
    print("\nAgainst issue 5's targets:")
    print(f"- interrupt p99 {p99:.2f} ms (target < 50 ms): {'met' if p99 < 50 else 'NOT met'}")
    met = "met" if ratio >= 0.1 else "NOT met"
    print(f"- /api/record at {ratio:.2f} of the /healthz rate (target >= 0.10): {met}")


if __name__ == "__main__":
    asyncio.run(main())
