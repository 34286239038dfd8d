"""What parsing costs: the DeepSeek provider against a bare httpx read of the same stream.

Run: ``python bench/provider_stream.py``. It starts the fake DeepSeek server
(core/testing/fake_upstream.py) in a child process, so only the client's work is
counted, and streams long replies from it:

* baseline: a bare ``httpx`` read of the response (``aiter_raw``), nothing parsed;
* lines: ``httpx``'s own ``aiter_lines``, what a naive client parses with;
* provider: ``DeepSeekProvider.stream``: SSE decoding, typed JSON decoding of
  every chunk, provider events, timeouts and usage.

For each it prints deltas per second and CPU microseconds per delta (process
time of this process only), and the ratio of the provider's CPU per delta to
the baseline's. The goal is a ratio of at most 1.5.

Two stream shapes are measured, because their costs differ: ``paced`` sends
each event on its own, as DeepSeek does while it generates (so every read
returns one event); ``burst`` sends as fast as the socket takes it (reads
return many events at once, the cheapest case for the bare read).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from pathlib import Path

import httpx
import msgspec

from core import ChatMessage, ChatRequest, ContentDelta
from providers.deepseek import DeepSeekProvider

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-bench-0123456789abcdef"
ROUNDS = 5
SHAPES = {
    # name: (tokens per reply, replies per round, seconds between events)
    "paced": (2_000, 1, 0.0002),
    "burst": (20_000, 1, 0.0),
}
REQUEST = ChatRequest(
    model="deepseek-v4-flash",
    messages=(ChatMessage(role="user", content="Write a long story about the sea."),),
)


def start_fake(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "core.testing.fake_upstream", "--port", str(port), "--api-key", KEY],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


async def wait_until_up(url: str) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            try:
                await client.get(url + "/models", headers={"Authorization": f"Bearer {KEY}"})
                return
            except httpx.TransportError:
                await asyncio.sleep(0.05)
    raise RuntimeError(f"the fake DeepSeek server did not start at {url}")


async def bare(client: httpx.AsyncClient, url: str, body: bytes) -> None:
    async with client.stream("POST", url + "/chat/completions", content=body) as response:
        async for _chunk in response.aiter_raw():
            pass


async def lines(client: httpx.AsyncClient, url: str, body: bytes) -> None:
    async with client.stream("POST", url + "/chat/completions", content=body) as response:
        async for _line in response.aiter_lines():
            pass


async def through_provider(provider: DeepSeekProvider, tokens: int) -> None:
    seen = 0
    async with aclosing(provider.stream(REQUEST)) as events:
        async for event in events:
            seen += isinstance(event, ContentDelta)
    # The fake's opening chunk carries no text; every other one is a delta.
    assert seen >= tokens - 1, f"the provider saw {seen} deltas of {tokens}"


async def measure(run: Callable[[], Awaitable[None]], deltas: int) -> tuple[float, float]:
    """(deltas per second, CPU microseconds per delta) of one run."""
    wall, cpu = time.perf_counter(), time.process_time()
    await run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return deltas / wall, cpu / deltas * 1e6


async def bench_shape(url: str, name: str, tokens: int, replies: int, delay: float) -> float:
    async with httpx.AsyncClient() as control:
        scenario = {"thinking": False, "tokens": tokens, "token_delay": delay}
        (await control.post(url + "/_fake/scenario", json=scenario)).raise_for_status()
    body = msgspec.json.encode(
        {
            "model": REQUEST.model,
            "messages": [{"role": "user", "content": "Write a long story about the sea."}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "thinking": {"type": "disabled"},
        }
    )
    options = msgspec.convert({"base_url": url, "api_key": KEY}, DeepSeekProvider.Options)
    provider = DeepSeekProvider("bench", options)
    await provider.open()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    client = httpx.AsyncClient(headers=headers, timeout=60)
    deltas = tokens * replies

    async def repeat(one: Callable[[], Awaitable[None]]) -> None:
        for _ in range(replies):
            await one()

    runs = {
        "baseline": lambda: repeat(lambda: bare(client, url, body)),
        "lines": lambda: repeat(lambda: lines(client, url, body)),
        "provider": lambda: repeat(lambda: through_provider(provider, tokens)),
    }
    results: dict[str, list[tuple[float, float]]] = {key: [] for key in runs}
    try:
        for run in runs.values():  # warm up connections and code paths
            await run()
        for _ in range(ROUNDS):  # interleaved, so drift affects every contender alike
            for key, run in runs.items():
                results[key].append(await measure(run, deltas))
    finally:
        await client.aclose()
        await provider.aclose()

    print(f"\n{name}: {replies} x {tokens} deltas, {delay * 1e6:.0f} us between events, median of {ROUNDS}")
    medians = {}
    for key, figures in results.items():
        rate = statistics.median(f[0] for f in figures)
        cpu = statistics.median(f[1] for f in figures)
        medians[key] = cpu
        print(f"  {key:<9} {rate:>10,.0f} deltas/s  {cpu:>7.2f} us CPU/delta")
    ratio = medians["provider"] / medians["baseline"]
    print(f"  provider / baseline CPU per delta: {ratio:.2f}x (goal <= 1.5x)")
    print(f"  provider / aiter_lines CPU per delta: {medians['provider'] / medians['lines']:.2f}x")
    return ratio


async def main() -> None:
    port = int(os.environ.get("BENCH_FAKE_PORT", "8617"))
    url = f"http://127.0.0.1:{port}"
    fake = start_fake(port)
    try:
        await wait_until_up(url)
        for name, (tokens, replies, delay) in SHAPES.items():
            await bench_shape(url, name, tokens, replies, delay)
    finally:
        fake.terminate()
        fake.wait(timeout=10)


if __name__ == "__main__":
    asyncio.run(main())
