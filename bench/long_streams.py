"""Many long streams at once: chatgate against a bare Litestar + aiohttp proxy on the same upstream.

Run: ``python bench/long_streams.py [--concurrency 256 1024] [--rounds 3]``.

The fake upstream (core/testing/fake_upstream.py) paces every reply like a model: 20 tokens,
20 ms apart (0.4 s a stream). ``chatgate serve`` (one worker, SQLite, an API key, billing on,
the key's limits off) and ``bench/bare_proxy.py`` (one uvicorn worker, no pool cap) relay it.
For each concurrency, every target gets that many callers, each streaming ``--rounds``
replies back to back after one uncounted round; it prints streams per second, p50/p99 of a
whole stream, time to first token, chatgate's ratio to the bare proxy, and chatgate's peak
RSS. The ratio is the figure: on a machine whose cores are shared by the load generator,
the upstream and the server, the absolute rates say more about the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
from pathlib import Path

from openai_overhead import (
    BODY,
    UPSTREAM_BODY,
    UPSTREAM_KEY,
    Run,
    Target,
    create_key,
    free_port,
    load,
    percentile,
    rss_mb,
    spawn,
    start,
    stop,
    wait_for,
)
from openai_overhead import CONFIG as OVERHEAD_CONFIG

TOKENS, TOKEN_DELAY = 20, 0.02
MASTER = "sk-bare-bench"
# openai_overhead's chatgate, the key's limits off (0) and room for every caller's connection.
CONFIG = (
    OVERHEAD_CONFIG.replace("requests_per_minute = 1000000", "requests_per_minute = 0")
    .replace("tokens_per_minute = 1000000000", "tokens_per_minute = 0")
    .replace("concurrent_requests = 1000", "concurrent_requests = 0")
).replace("workers = 1\n", "workers = 1\nmax_connections = 4096\n")
assert CONFIG.count(" = 0\n") == 3, "openai_overhead's CONFIG changed its limits"


class PeakRss:
    """Samples a process's RSS every 50 ms while it runs; ``peak`` is the highest seen (MB)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._done = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


async def streams(target: Target, concurrency: int, rounds: int) -> Run:
    body = {**target.body, "stream": True}
    return await load(
        target.url, target.path, target.headers, body, concurrency, concurrency * rounds, warmup=concurrency
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--rounds", type=int, default=3, help="measured streams per caller (default 3)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="chatgate-long-"))
    upstream_port, gateway_port, bare_port = free_port(), free_port(), free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    fake = spawn("-m", "core.testing.fake_upstream", "--port", str(upstream_port), "--api-key", UPSTREAM_KEY,
                 "--tokens", str(TOKENS), "--token-delay", str(TOKEN_DELAY), "--history", "100")  # fmt: skip
    direct = Target("direct", upstream, "/chat/completions", {"Authorization": f"Bearer {UPSTREAM_KEY}"},
                    UPSTREAM_BODY, fake)  # fmt: skip
    await wait_for(direct.url, direct.path, direct.headers, direct.body)

    config = tmp / "plugins.toml"
    config.write_text(
        CONFIG.format(port=gateway_port, db=tmp / "bench.db", upstream=upstream, key=UPSTREAM_KEY)
    )
    env = {**os.environ, "CHATGATE_CONFIG": str(config)}
    chatgate = Target("chatgate", f"http://127.0.0.1:{gateway_port}", "/v1/chat/completions",
                      {"Authorization": f"Bearer {create_key(env)}"}, BODY)  # fmt: skip
    bare = Target("bare proxy", f"http://127.0.0.1:{bare_port}", "/v1/chat/completions",
                  {"Authorization": f"Bearer {MASTER}"}, UPSTREAM_BODY)  # fmt: skip
    bare_env = {**os.environ, "UPSTREAM_BASE": upstream, "UPSTREAM_KEY": UPSTREAM_KEY, "MASTER_KEY": MASTER}
    rows: list[tuple[int, str, Run, float | None]] = []
    try:
        await start(chatgate, ["-m", "core.cli", "serve"], env)
        await start(bare, ["-m", "uvicorn", "bare_proxy:app", "--app-dir", "bench", "--port", str(bare_port),
                           "--log-level", "warning", "--no-access-log"], bare_env)  # fmt: skip
        for concurrency in args.concurrency:
            for target in (bare, chatgate):  # the same load, one after the other
                assert target.process is not None
                with PeakRss(target.process.pid) as rss:
                    run = await streams(target, concurrency, args.rounds)
                rows.append((concurrency, target.name, run, rss.peak))
                await asyncio.sleep(1)  # let the last streams' connections close
    finally:
        for target in (bare, chatgate, direct):
            stop(target)

    print(f"\n{TOKENS} tokens {TOKEN_DELAY * 1000:.0f} ms apart per stream; one worker each; "
          f"{args.rounds} measured streams per caller")  # fmt: skip
    print(
        "| streams at once | server | streams/s | vs bare | p50 s | p99 s | TTFT p50 ms | errors | RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    bare_rate = {c: run.rps() for c, name, run, _ in rows if name == "bare proxy"}
    for concurrency, name, run, peak in rows:
        ratio = f"{run.rps() / bare_rate[concurrency]:.0%}" if name == "chatgate" else "-"
        p50, p99 = percentile(run.latencies, 0.5) / 1000, percentile(run.latencies, 0.99) / 1000
        print(
            f"| {concurrency:,} | {name} | {run.rps():,.0f} | {ratio} | {p50:.2f} | {p99:.2f} "
            f"| {percentile(run.first_tokens, 0.5):.0f} | {run.errors} | {peak:.0f} |"
        )


if __name__ == "__main__":
    started = time.perf_counter()
    asyncio.run(main())
    print(f"\n({time.perf_counter() - started:.0f} s)")
