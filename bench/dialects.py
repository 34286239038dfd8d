"""What a dialect's translation costs: ``/v1/messages`` and ``/v1/responses`` against chat completions.

Run: ``python bench/dialects.py [--requests N] [--passes P]`` (about a minute by default).

It starts the fake DeepSeek server (core/testing/fake_upstream.py, 24-token replies) and one
``chatgate serve`` (one worker, SQLite, an API key with generous limits, billing on, the
openai_compat and anthropic_messages surfaces), then sends the same one-question chat in three
dialects through it, whole and streamed, at concurrency 16 (bench/openai_overhead.py's load
generator, uncounted warm-up first):

- ``chat``: ``POST /v1/chat/completions``, the baseline;
- ``messages``: ``POST /v1/messages`` (Anthropic), the same question and ``max_tokens``;
- ``responses``: ``POST /v1/responses`` with ``store: false``, so that what is measured is the
  translation, like the other two (a stored response also writes its conversation: that
  cost is printed on its own line, ``responses+store``).

The dialects take turns within each pass, in a rotated order, over ``--passes`` passes, so a
neighbour's load on this shared machine falls on all of them alike. CPU is user plus system
time of the chatgate process from /proc, per request, warm-up included. The goal (issue 19):
each translation costs at most 15% more CPU per request than chat completions (ratio <= 1.15).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import openai_overhead
from openai_overhead import (
    BODY,
    CONFIG,
    UPSTREAM_KEY,
    WARMUP,
    Run,
    Target,
    cpu_seconds,
    create_key,
    free_port,
    load,
    percentile,
    spawn,
    start,
    stop,
    wait_for,
)

QUESTION = BODY["messages"]
SURFACES = """
[surfaces.anthropic_messages]
enabled = true
"""
CONCURRENCY = 16

# What marks a stream's first token, per dialect (the load generator times the first chunk matching).
TOKEN = {
    "chat": re.compile(rb'"content":"[^"]'),
    "messages": re.compile(rb'"text_delta","text":"[^"]|"text":"[^"]'),
    "responses": re.compile(rb'"delta":"[^"]'),
}


@dataclass
class Dialect:
    """One way of asking the same question."""

    name: str
    path: str
    body: dict[str, object]
    token: re.Pattern[bytes]
    cpu_ms: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})
    runs: dict[bool, list[Run]] = field(default_factory=lambda: {False: [], True: []})


def dialects() -> list[Dialect]:
    return [
        Dialect("chat", "/v1/chat/completions", dict(BODY), TOKEN["chat"]),
        Dialect(
            "messages",
            "/v1/messages",
            {"model": BODY["model"], "max_tokens": 1024, "messages": QUESTION},
            TOKEN["messages"],
        ),
        Dialect(
            "responses",
            "/v1/responses",
            {"model": BODY["model"], "input": QUESTION[0]["content"], "store": False},  # type: ignore[index]
            TOKEN["responses"],
        ),
        Dialect(
            "responses+store",
            "/v1/responses",
            {"model": BODY["model"], "input": QUESTION[0]["content"]},  # type: ignore[index]
            TOKEN["responses"],
        ),
    ]


async def measure(gateway: Target, dialect: Dialect, stream: bool, requests: int) -> None:
    """One cell of one pass: ``requests`` counted requests at :data:`CONCURRENCY`, and the CPU they took."""
    assert gateway.process is not None
    openai_overhead.sse_token = dialect.token.search  # type: ignore[assignment]
    before = cpu_seconds(gateway.process.pid)
    body = {**dialect.body, "stream": stream}
    run = await load(gateway.url, dialect.path, gateway.headers, body, CONCURRENCY, requests, warmup=WARMUP)
    spent = cpu_seconds(gateway.process.pid) - before
    if run.errors:
        raise RuntimeError(f"{dialect.name} ({'stream' if stream else 'whole'}): {run.errors} errors")
    dialect.cpu_ms[stream].append(spent / (WARMUP + requests) * 1000)
    dialect.runs[stream].append(run)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="counted requests per cell (default 1000)")
    parser.add_argument("--passes", type=int, default=5, help="passes over all cells (default 5)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="chatgate-bench-"))
    upstream_port, gateway_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    fake = spawn("-m", "core.testing.fake_upstream", "--port", str(upstream_port), "--api-key", UPSTREAM_KEY,
                 "--tokens", "24")  # fmt: skip
    direct = Target("direct", upstream, "/chat/completions", {"Authorization": f"Bearer {UPSTREAM_KEY}"}, {})
    await wait_for(direct.url, direct.path, direct.headers, {**BODY, "model": "deepseek-v4-flash"})
    config = tmp / "plugins.toml"
    config.write_text(
        CONFIG.format(port=gateway_port, db=tmp / "bench.db", upstream=upstream, key=UPSTREAM_KEY) + SURFACES
    )
    env = {**os.environ, "CHATGATE_CONFIG": str(config)}
    key = create_key(env)
    gateway = Target(
        "chatgate", f"http://127.0.0.1:{gateway_port}", "/v1/chat/completions",
        {"Authorization": f"Bearer {key}"}, BODY,
    )  # fmt: skip
    cases = dialects()
    try:
        await start(gateway, ["-m", "core.cli", "serve"], env)
        for number in range(args.passes):
            order = cases[number % len(cases) :] + cases[: number % len(cases)]
            for stream in (False, True):
                for dialect in order:
                    await measure(gateway, dialect, stream, args.requests)
            print(f"pass {number + 1} of {args.passes} done", flush=True)
    finally:
        stop(gateway)
        fake.terminate()
        fake.wait(15)

    print(
        f"\nOne chatgate worker, SQLite, billing on; concurrency {CONCURRENCY}; {args.passes} passes of "
        f"{args.requests} requests per cell ({WARMUP} uncounted first); medians over the passes\n"
    )
    print("| mode | dialect | req/s | p50 ms | p99 ms | CPU ms/req | vs chat (CPU) |")
    print("|---|---|---|---|---|---|---|")
    baseline = {stream: median(cases[0].cpu_ms[stream]) for stream in (False, True)}
    verdicts = []
    for stream in (False, True):
        for dialect in cases:
            runs = dialect.runs[stream]
            latencies = [x for run in runs for x in run.latencies]
            rps = median([run.rps() for run in runs])
            cpu = median(dialect.cpu_ms[stream])
            ratio = cpu / baseline[stream]
            mode = "stream" if stream else "whole"
            print(
                f"| {mode} | {dialect.name} | {rps:,.0f} | {percentile(latencies, 0.5):.2f} "
                f"| {percentile(latencies, 0.99):.2f} | {cpu:.3f} | {ratio:.2f}x |"
            )
            if dialect.name in ("messages", "responses"):
                verdicts.append(
                    f"- {dialect.name}, {mode}: {ratio:.2f}x chat's CPU per request (target <= 1.15x)"
                )
    print("\nTargets:")
    print("\n".join(verdicts))


if __name__ == "__main__":
    asyncio.run(main())
