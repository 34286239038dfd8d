"""How much the generation runner costs on top of the provider, and how fast the store writes.

Run: ``python bench/generations.py``. Prints figures and ratios against baselines
measured in the same process:

* stream: tokens/s consuming the mock provider directly (baseline) versus through the
  runner, which persists the reply at the flush interval and feeds a live follower;
* store: sequential versus 50-way concurrent message appends and ledger charges on SQLite.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from contextlib import aclosing
from pathlib import Path

from core import ChatMessage, ChatRequest, LedgerDraft, MessageDraft, ModelConfig, Route
from core.services.billing import Billing
from core.services.generations import Generations
from providers.mock import MockProvider
from stores.sqlite import SqliteStore

REPEATS = 5
REPLIES = 40
REQUEST = ChatRequest(
    model="mock-reasoner",
    messages=(ChatMessage(role="user", content="Explain how tides work, in detail, with examples."),),
)


async def direct(provider: MockProvider) -> int:
    tokens = 0
    for _ in range(REPLIES):
        async with aclosing(provider.stream(REQUEST)) as events:
            async for _event in events:
                tokens += 1
    return tokens


async def through_runner(provider: MockProvider, store: SqliteStore, runner: Generations) -> int:
    user = await store.ensure_user("bench@example.com")
    conversation = await store.create_conversation(user.id, "bench")
    route = Route("mock-reasoner", ModelConfig(provider="mock"), provider)
    tokens = 0
    for _ in range(REPLIES):
        draft = MessageDraft(role="assistant", status="generating")
        reply = await store.append_message(conversation.id, draft)
        generation = await runner.run(conversation.id, reply.id, route, REQUEST)
        async for _event in generation.follow():
            tokens += 1
        await generation.wait()
    return tokens


async def timed(work) -> tuple[float, int]:
    started = time.perf_counter()
    count = await work()
    return time.perf_counter() - started, count


async def bench_stream(store: SqliteStore) -> None:
    provider = MockProvider("mock", MockProvider.Options(first_token_delay=0, token_delay=0))
    runner = Generations(store, Billing(store, {}), flush_interval=0.05, stale_after=30)
    await runner.start()
    base, ours, overhead = [], [], []
    for _ in range(REPEATS):
        direct_s, tokens = await timed(lambda: direct(provider))
        base.append(tokens / direct_s)
        runner_s, tokens = await timed(lambda: through_runner(provider, store, runner))
        ours.append(tokens / runner_s)
        overhead.append((runner_s - direct_s) / REPLIES * 1000)
    await runner.aclose()
    b, o = statistics.median(base), statistics.median(ours)
    per_reply = tokens // REPLIES
    print(
        f"stream  direct from provider: {b:12,.0f} events/s (median of {REPEATS}, {per_reply} events/reply)"
    )
    print(f"stream  through the runner:   {o:12,.0f} events/s  ratio {o / b:.2f}x of direct")
    cost = statistics.median(overhead)
    print(f"stream  runner cost per reply: {cost:11.2f} ms (task, 2 store writes, follower)")


async def bench_store(store: SqliteStore) -> None:
    user = await store.ensure_user("ledger@example.com")
    conversation = await store.create_conversation(user.id, "bench")
    n = 500

    async def appends_sequential() -> int:
        for i in range(n):
            await store.append_message(conversation.id, MessageDraft(role="user", content=f"m{i}"))
        return n

    async def appends_concurrent() -> int:
        for _ in range(n // 50):
            draft = MessageDraft(role="user", content="c")
            await asyncio.gather(*(store.append_message(conversation.id, draft) for _ in range(50)))
        return n

    async def charges_sequential() -> int:
        for _ in range(n):
            await store.post_ledger(LedgerDraft(user_id=user.id, amount=-1, kind="charge"), floor=None)
        return n

    async def charges_concurrent() -> int:
        for _ in range(n // 50):
            draft = LedgerDraft(user_id=user.id, amount=-1, kind="charge")
            await asyncio.gather(*(store.post_ledger(draft, floor=None) for _ in range(50)))
        return n

    for label, sequential, concurrent in (
        ("appends", appends_sequential, appends_concurrent),
        ("charges", charges_sequential, charges_concurrent),
    ):
        seq = statistics.median([n / (await timed(sequential))[0] for _ in range(REPEATS)])
        con = statistics.median([n / (await timed(concurrent))[0] for _ in range(REPEATS)])
        print(f"sqlite  {label} sequential:       {seq:12,.0f} /s")
        print(f"sqlite  {label} 50 concurrent:    {con:12,.0f} /s  ratio {con / seq:.2f}x of sequential")


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore("sqlite", SqliteStore.Options(path=str(Path(tmp) / "bench.db")))
        await store.open()
        try:
            await bench_stream(store)
            await bench_store(store)
        finally:
            await store.aclose()


if __name__ == "__main__":
    asyncio.run(main())
