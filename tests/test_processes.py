"""Many processes on one store acting as one server (core.cluster): real `chatgate serve` processes.

Each test runs against both stores that processes can share: one SQLite file (workers of one
host) and one PostgreSQL schema (instances anywhere). The upstream is the fake DeepSeek in this
test process, which sees when a process closes its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from core import LedgerDraft, MessageDraft, RateLimits, Store
from core.services.accounts import Accounts
from core.testing.fake_upstream import FakeUpstream, Scenario
from stores.postgres import PostgresStore
from stores.sqlite import SqliteStore
from tests.conftest import Servers, deepseek_config
from tests.postgres import Database

MODELS = """
[models.deepseek-chat]
provider = "deepseek"
input_price = 1000
output_price = 2000
context_tokens = 65536
max_output_tokens = 100
"""
LONG = " ".join(f"word{i}" for i in range(2000))
STALL = 40
"""Where a stalling upstream stops: after its role event and 39 words, the last ``word38``."""


@pytest.fixture(params=["sqlite", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


class Cluster:
    """A shared configuration, its store opened here too (to set up keys and read the ledger),
    and the processes serving it."""

    def __init__(self, config: Path, store: Store, servers: Servers) -> None:
        self.config = config
        self.store = store
        self.servers = servers

    def start(self) -> str:
        return self.servers(self.config)

    def kill(self, url: str) -> None:
        """``kill -9``: nothing runs on the way out."""
        process = self.servers.processes.pop(url)
        process.kill()
        process.wait()

    async def key(self, balance: int, limits: RateLimits = RateLimits()) -> tuple[int, int, str]:
        """A new user with ``balance`` and a key with ``limits``: (user id, key id, secret)."""
        key, secret = await Accounts(self.store).create_key(f"u{time.monotonic_ns()}@example.com")
        if balance:
            await self.store.post_ledger(LedgerDraft(user_id=key.user_id, amount=balance, kind="topup"))
        await self.store.set_api_key_limits(key.id, limits)
        return key.user_id, key.id, secret


@pytest.fixture
async def cluster(
    store_kind: str,
    request: pytest.FixtureRequest,
    fake_deepseek: FakeUpstream,
    write_config: Callable[..., Path],
    server_process: Servers,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    # stale_after is long: what a dead process left must be found because it is dead, not old.
    replace = {"stale_after = 1\n": "stale_after = 30\n", "[surfaces.email_socket]\n": EMAIL}
    if store_kind == "postgres":
        postgres: Database = request.getfixturevalue("postgres")
        schema = postgres.schema()
        sqlite_section = f'[store]\nplugin = "sqlite"\npath = "{tmp_path / "chatgate.db"}"\n'
        replace[sqlite_section] = postgres.store_section(schema)
        store: Store = PostgresStore("postgres", PostgresStore.Options(dsn=postgres.dsn, schema=schema))
    else:
        store = SqliteStore("sqlite", SqliteStore.Options(path=str(tmp_path / "chatgate.db")))
    config = write_config(
        deepseek_config(fake_deepseek.url, extra="max_retries = 0") + MODELS, replace=replace
    )
    await store.open()
    try:
        yield Cluster(config, store, server_process)
    finally:
        await store.aclose()


EMAIL = '[surfaces.email_socket]\nmodel = "deepseek-chat"\n'


async def chat(client: httpx.AsyncClient, url: str, email: str, text: str) -> dict[str, Any]:
    response = await client.post(f"{url}/api/chat", json={"email": email, "inp": text}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def record(client: httpx.AsyncClient, url: str, email: str) -> dict[str, Any]:
    response = await client.post(f"{url}/api/record", json={"email": email})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def partial_on(client: httpx.AsyncClient, url: str, email: str, showing: str) -> str:
    """The growing reply as ``url`` shows it (code 201), once it shows ``showing``."""
    async with asyncio.timeout(20):
        while True:
            seen = await record(client, url, email)
            text = seen["text"][-1]["content"] if seen["text"] else ""
            if seen["code"] == 201 and showing in text:
                return str(text)
            await asyncio.sleep(0.02)


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` until it holds (the caller bounds the wait): the state lives in other processes."""
    while not await check():  # noqa: ASYNC110 - no event crosses the process boundary
        await asyncio.sleep(0.02)


async def settled(client: httpx.AsyncClient, url: str, email: str) -> bool:
    """Whether ``url`` shows the email's conversation with nothing generating (code 200)."""
    return (await record(client, url, email))["code"] == 200


async def admitted(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]
) -> bool:
    return (await client.post(url, json={**body, "stream": False}, headers=headers)).status_code == 200


async def persisted(cluster: Cluster, url: str, email: str) -> str:
    """The reply being generated once the upstream stalled (at :data:`STALL`) and the store holds
    all of it: what a crash of that process keeps."""
    async with httpx.AsyncClient() as client, asyncio.timeout(20):
        while True:
            live = (await record(client, url, email))["text"][-1]["content"]
            user = await cluster.store.find_user(email)
            assert user is not None
            [conversation] = await cluster.store.list_conversations(user.id, "email")
            stored = (await cluster.store.list_messages(conversation.id))[-1].content
            if stored == live and live.rstrip().endswith(f"word{STALL - 2}"):
                return str(stored)
            await asyncio.sleep(0.02)


async def test_a_newer_chat_on_another_process_interrupts_the_reply_and_keeps_it(
    cluster: Cluster, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.script(Scenario(content=LONG, token_delay=0.01), Scenario(content="Second answer."))
    first_process, second_process = cluster.start(), cluster.start()
    async with httpx.AsyncClient() as client:
        first = asyncio.create_task(chat(client, first_process, "a@example.com", "Tell me a long story"))
        # The other process shows the reply growing, from what the first one persists.
        partial = await partial_on(client, second_process, "a@example.com", "word2")
        asked = time.monotonic()
        second = await chat(client, second_process, "a@example.com", "Stop, answer this instead")
        older = await first
        closed = await fake_deepseek.wait_for_disconnect(timeout=10)
        assert older == {"status": True, "code": 200, "exit": 1}
        assert second == {"status": True, "code": 200, "exit": 0}
        # The first process closed its upstream request well within a second of the newer chat.
        assert closed - asked < 1.0
        shown = await record(client, first_process, "a@example.com")
    assert [(e["role"], e.get("status")) for e in shown["text"]] == [
        ("user", None),
        ("ai", "interrupted"),
        ("user", None),
        ("ai", None),
    ]
    kept = shown["text"][1]["content"]
    assert kept.startswith(partial)
    assert not kept.endswith("word1999")
    assert shown["text"][3]["content"] == "Second answer."


async def test_what_a_killed_process_left_is_taken_over_by_the_others_within_seconds(
    cluster: Cluster, fake_deepseek: FakeUpstream
) -> None:
    # A reply that stalls (the process is killed mid-reply), and a /v1 request that holds its
    # key's only concurrency slot.
    fake_deepseek.script(Scenario(content=LONG, token_delay=0.01, stall_after=STALL), Scenario(stall_after=2))
    dying, survivor = cluster.start(), cluster.start()
    user_id, _, secret = await cluster.key(10**9, RateLimits(concurrent_requests=1))
    headers = {"Authorization": f"Bearer {secret}"}
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    async with httpx.AsyncClient(timeout=30) as client:
        asked = asyncio.create_task(chat(client, dying, "crash@example.com", "Tell me a long story"))
        await partial_on(client, survivor, "crash@example.com", "word30")
        partial = await persisted(cluster, dying, "crash@example.com")
        stream = client.stream("POST", f"{dying}/v1/chat/completions", json=body, headers=headers)
        async with stream as held:
            assert held.status_code == 200
            busy = await client.post(f"{survivor}/v1/chat/completions", json=body, headers=headers)
            assert busy.status_code == 429  # the slot is the dying process's
            killed = time.monotonic()
            cluster.kill(dying)
            async with asyncio.timeout(10):  # the promise: within 10 s of the kill
                await until(lambda: settled(client, survivor, "crash@example.com"))
                await until(lambda: admitted(client, f"{survivor}/v1/chat/completions", body, headers))
            took = time.monotonic() - killed
        asked.cancel()
        shown = await record(client, survivor, "crash@example.com")
    assert took < 10
    reply = shown["text"][-1]
    assert reply["status"] == "interrupted"
    assert reply["content"] == partial

    async def all_settled() -> bool:  # the survivor's own request settles just after it answers
        return not [e for e in await cluster.store.list_ledger(user_id) if e.kind in ("reservation", "lease")]

    async with asyncio.timeout(10):
        await until(all_settled)


async def test_a_lone_server_restarted_after_kill_takes_over_its_own_leftovers_as_it_starts(
    cluster: Cluster, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(content=LONG, token_delay=0.01, stall_after=STALL)
    first = cluster.start()
    async with httpx.AsyncClient(timeout=30) as client:
        asked = asyncio.create_task(chat(client, first, "alone@example.com", "Tell me a long story"))
        await partial_on(client, first, "alone@example.com", "word30")
        partial = await persisted(cluster, first, "alone@example.com")
        cluster.kill(first)
        asked.cancel()
        started = time.monotonic()
        again = await asyncio.to_thread(cluster.start)
        ready = time.monotonic() - started
        # Taken over while starting, before it answered anything: no wait after that.
        shown = await record(client, again, "alone@example.com")
    assert shown["code"] == 200
    assert shown["text"][-1]["status"] == "interrupted"
    assert shown["text"][-1]["content"] == partial
    print(f"restarted and recovered in {ready:.2f} s")  # the promise is 3 s; process start included


PRICED = """
[models.deepseek-chat]
provider = "deepseek"
input_price = 0
output_price = 1000000
context_tokens = 65536
max_output_tokens = 10
"""
"""One credit per output token, at most 10: every request's worst case is 10 credits, and the
fake (which honours max_tokens) makes each cost exactly that."""
CREDIT = 1_000_000


@pytest.fixture
def metered(cluster: Cluster, write_config: Callable[..., Path]) -> Cluster:
    text = cluster.config.read_text()
    assert MODELS in text
    cluster.config.write_text(text.replace(MODELS, PRICED))
    return cluster


def spread(urls: list[str], count: int) -> list[str]:
    """``count`` request targets, round robin over ``urls``."""
    return [urls[i % len(urls)] for i in range(count)]


async def test_a_balance_for_ten_admits_ten_of_sixty_spread_over_three_processes(
    metered: Cluster, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(token_delay=0.01)
    urls = [metered.start() for _ in range(3)]
    user_id, _, secret = await metered.key(10 * 10 * CREDIT)
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Hi"}]}
    headers = {"Authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(timeout=60) as client:
        answers = await asyncio.gather(
            *(
                client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
                for url in spread(urls, 60)
            )
        )
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses.count(200) == 10, statuses
    assert set(statuses) == {200, 403}, statuses  # the rest: insufficient_quota
    user = await metered.store.get_user(user_id)
    assert user.balance == 0  # spent exactly, never below


async def test_requests_per_minute_are_exact_across_three_processes(
    cluster: Cluster, fake_deepseek: FakeUpstream
) -> None:
    urls = [cluster.start() for _ in range(3)]
    _, _, secret = await cluster.key(10**12, RateLimits(requests_per_minute=12))
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Hi"}]}
    headers = {"Authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(timeout=60) as client:
        answers = await asyncio.gather(
            *(
                client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
                for url in spread(urls, 30)
            )
        )
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(200) == 12, statuses
    assert statuses.count(429) == 18, statuses


async def test_concurrency_slots_are_shared_across_three_processes(
    cluster: Cluster, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(content=LONG, token_delay=0.01, stall_after=STALL)
    urls = [cluster.start() for _ in range(3)]
    _, _, secret = await cluster.key(10**12, RateLimits(concurrent_requests=2))
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    headers = {"Authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(timeout=60) as client, contextlib.AsyncExitStack() as streams:
        opened = [
            await streams.enter_async_context(
                client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers)
            )
            for url in spread(urls, 9)
        ]
        statuses = [response.status_code for response in opened]
        assert statuses.count(200) == 2, statuses
        assert statuses.count(429) == 7, statuses
        assert fake_deepseek.active_streams == 2


class Cable:
    """A TCP relay from the processes to PostgreSQL that the test can cut and mend."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._links: set[asyncio.StreamWriter] = set()
        self._cut = False
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Cable:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()

    def cut(self) -> None:
        """Every connection through the cable breaks, and new ones are closed at once."""
        self._cut = True
        for writer in list(self._links):
            writer.transport.abort()

    def mend(self) -> None:
        self._cut = False

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._links |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._links -= {writer, up_writer}


async def test_a_process_cut_off_from_postgresql_admits_nothing_until_it_is_back(
    postgres: Database,
    fake_deepseek: FakeUpstream,
    write_config: Callable[..., Path],
    server_process: Servers,
    tmp_path: Path,
) -> None:
    schema = postgres.schema()
    async with Cable(5432) as cable:
        dsn = postgres.dsn.replace("127.0.0.1:5432", f"127.0.0.1:{cable.port}")
        assert dsn != postgres.dsn
        sqlite_section = f'[store]\nplugin = "sqlite"\npath = "{tmp_path / "chatgate.db"}"\n'
        store_section = f'[store]\nplugin = "postgres"\ndsn = "{dsn}"\nschema = "{schema}"\n'
        config = write_config(
            deepseek_config(fake_deepseek.url) + MODELS, replace={sqlite_section: store_section}
        )
        url = await asyncio.to_thread(server_process, config)  # the cable runs on this loop meanwhile
        store = PostgresStore("postgres", PostgresStore.Options(dsn=postgres.dsn, schema=schema))
        await store.open()
        try:
            key, secret = await Accounts(store).create_key("cut@example.com")
            await store.post_ledger(LedgerDraft(user_id=key.user_id, amount=10**12, kind="topup"))
        finally:
            await store.aclose()
        body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Hi"}]}
        headers = {"Authorization": f"Bearer {secret}"}
        completions = f"{url}/v1/chat/completions"
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await client.post(completions, json=body, headers=headers)).status_code == 200
            cable.cut()
            async with asyncio.timeout(10):
                await until(lambda: health(client, url, 503))
            health_body = (await client.get(f"{url}/healthz")).json()
            assert health_body == {"status": "unavailable", "version": health_body["version"]}
            refused = await client.post(completions, json=body, headers=headers)
            assert refused.status_code == 503, refused.text
            cable.mend()
            async with asyncio.timeout(10):
                await until(lambda: health(client, url, 200))
            assert (await client.post(completions, json=body, headers=headers)).status_code == 200
    log = "".join(path.read_text() for path in tmp_path.glob("serve-*.log"))  # noqa: ASYNC240 - done
    assert "out of standing" in log
    assert "joined the store again" in log


async def health(client: httpx.AsyncClient, url: str, status: int) -> bool:
    return (await client.get(f"{url}/healthz")).status_code == status


TOPICS = """[surfaces.topic_chat]
[[surfaces.topic_chat.series]]
id = 1
name = "DeepSeek"
models = [{ id = 1, model = "deepseek-chat" }]
"""


async def test_a_regenerate_on_another_process_replaces_the_running_reply(
    cluster: Cluster, fake_deepseek: FakeUpstream
) -> None:
    text = cluster.config.read_text()
    cluster.config.write_text(text.replace("[surfaces.topic_chat]\n", TOPICS, 1))
    fake_deepseek.script(
        Scenario(content="A1"), Scenario(content=LONG, token_delay=0.01), Scenario(content="A1 again")
    )
    first_process, second_process = cluster.start(), cluster.start()
    _, _, secret = await cluster.key(10**12)
    headers = {"Authorization": f"Bearer {secret}"}
    pick = {"seriesId": 1, "modelId": 1, "enableMemory": True}
    async with httpx.AsyncClient(timeout=60, headers=headers) as client:
        topic = (await client.post(f"{first_process}/chat/topic", json={"name": "t", "seriesId": 1})).json()
        path = f"/chat/topic/{topic['id']}/message"
        sent = await client.post(f"{first_process}{path}", json={**pick, "message": "Q1"})
        reply_id = json.loads(sent.text.rpartition("¦")[2])["assistantMsgId"]
        regenerate = f"{path}/{reply_id}/regenerate"
        running = asyncio.create_task(client.post(f"{first_process}{regenerate}", json=pick))

        async def growing() -> bool:
            shown = (await client.get(f"{second_process}{path}")).json()
            return "word2" in shown[-1]["message"]

        async with asyncio.timeout(20):
            await until(growing)  # the other process shows the reply as it grows
        # Nor can it be edited there meanwhile: the running process's next flush would undo that.
        edit = await client.patch(f"{second_process}{path}/{reply_id}", json={"message": "x"})
        assert edit.status_code == 409, edit.text
        again = await client.post(f"{second_process}{regenerate}", json=pick)
        older = await running
        shown = (await client.get(f"{first_process}{path}")).json()
    assert again.status_code == 200
    assert again.text.startswith("A1 again¦")
    assert older.status_code == 200
    assert "word2" in older.text
    assert "word1999" not in older.text  # cut short by the newer regenerate
    assert [(m["id"], m["message"]) for m in shown][-1] == (reply_id, "A1 again")


async def test_workers_of_one_sqlite_file_interrupt_each_others_replies(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], server_process: Servers
) -> None:
    """The symptom this began with: under `--workers 2`, a newer chat ran beside the older one
    whenever the kernel gave the two to different workers. Now it interrupts it wherever."""
    config = write_config(
        deepseek_config(fake_deepseek.url, extra="max_retries = 0") + MODELS,
        replace={"[surfaces.email_socket]\n": EMAIL},
    )
    url = await asyncio.to_thread(server_process, config, "--workers", "2")
    tries = 4
    for n in range(tries):
        fake_deepseek.script(Scenario(content=LONG, token_delay=0.01), Scenario(content="Second answer."))
        # A client per request: a new connection, which either worker may take.
        async with httpx.AsyncClient() as first_client, httpx.AsyncClient() as second_client:
            first = asyncio.create_task(chat(first_client, url, f"w{n}@example.com", "Tell me a long story"))
            await partial_on(second_client, url, f"w{n}@example.com", "word2")
            second = await chat(second_client, url, f"w{n}@example.com", "Stop")
            assert (await first)["exit"] == 1
            assert second["exit"] == 0


async def test_a_reply_superseded_without_a_signal_stops_itself(
    cluster: Cluster, fake_deepseek: FakeUpstream
) -> None:
    """The fence behind the signal: a newer message written by another process that never
    signalled (two questions at once, a lost datagram) stops the older reply at its next flush."""
    fake_deepseek.scenario = Scenario(content=LONG, token_delay=0.01)
    url = cluster.start()
    async with httpx.AsyncClient(timeout=30) as client:
        asked = asyncio.create_task(chat(client, url, "fence@example.com", "Tell me a long story"))
        await partial_on(client, url, "fence@example.com", "word2")
        user = await cluster.store.find_user("fence@example.com")
        assert user is not None
        [conversation] = await cluster.store.list_conversations(user.id, "email")
        await cluster.store.append_message(conversation.id, MessageDraft(role="user", content="newer"))
        assert (await asked)["exit"] == 1
        shown = await record(client, url, "fence@example.com")
    assert [(e["role"], e.get("status")) for e in shown["text"]] == [
        ("user", None),
        ("ai", "interrupted"),
        ("user", None),
    ]
    assert not shown["text"][1]["content"].endswith("word1999")
