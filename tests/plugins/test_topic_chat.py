"""The topic-chat surface (seed 002) against a live gateway and the fake DeepSeek upstream."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from core import RateLimits
from core.hookspecs import hookimpl
from core.search import WebResult, WebSearch
from core.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import PRICED_MODELS, RunningGateway, deepseek_config

CATALOG = """[surfaces.topic_chat]
max_message_chars = 100
[[surfaces.topic_chat.series]]
id = 1
name = "DeepSeek"
models = [{ id = 1, model = "deepseek-chat" }, { id = 2, model = "deepseek-reasoner", name = "Thinking" }]
[[surfaces.topic_chat.series]]
id = 7
name = "Local"
models = [{ id = 3, model = "mock-chat" }]
"""
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
FUNDS = 100_000_000


class User:
    """One key holder talking to the topic-chat API."""

    def __init__(self, gateway: RunningGateway, key: str, user_id: int) -> None:
        self.gateway = gateway
        self.key = key
        self.id = user_id
        self.headers = {"Authorization": f"Bearer {key}"}

    async def call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return await self.gateway.client.request(method, path, json=body, headers=self.headers, timeout=30)

    def stream(self, method: str, path: str, body: Any) -> Any:
        return self.gateway.client.stream(method, path, json=body, headers=self.headers, timeout=30)

    async def topic(self, name: str = "t", series: int = 1) -> dict[str, Any]:
        response = await self.call("POST", "/chat/topic", {"name": name, "seriesId": series})
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    async def send(self, topic_id: int, text: str, **extra: Any) -> tuple[str, dict[str, Any]]:
        body = {"seriesId": 1, "modelId": 1, "message": text, "enableMemory": True, **extra}
        response = await self.call("POST", f"/chat/topic/{topic_id}/message", body)
        assert response.status_code == 200, response.text
        return split(response.text)

    async def messages(self, topic_id: int) -> list[dict[str, Any]]:
        response = await self.call("GET", f"/chat/topic/{topic_id}/message")
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]


def split(text: str) -> tuple[str, dict[str, Any]]:
    reply, separator, meta = text.rpartition("¦")
    assert separator, text
    return reply, json.loads(meta)


@pytest.fixture
def topic_config(fake_deepseek: FakeUpstream, write_config: Callable[..., Path]) -> Callable[..., Path]:
    def write(extra: str = "") -> Path:
        return write_config(  # type: ignore[no-any-return]
            deepseek_config(fake_deepseek.url, extra="max_retries = 0") + PRICED_MODELS + extra,
            replace={"[surfaces.topic_chat]\n": CATALOG},
        )

    return write


async def user_on(gateway: RunningGateway, email: str, funds: int = FUNDS) -> User:
    key, secret = await gateway.services.accounts.create_key(email)
    if funds:
        await gateway.services.billing.top_up(key.user_id, funds)
    return User(gateway, secret, key.user_id)


@pytest.fixture
async def gateway(
    topic_config: Callable[..., Path], gateway_factory: Callable[..., object]
) -> RunningGateway:
    return await gateway_factory(topic_config())  # type: ignore[no-any-return,misc]


@pytest.fixture
async def alice(gateway: RunningGateway) -> User:
    return await user_on(gateway, "alice@example.com")


@pytest.fixture
async def bob(gateway: RunningGateway) -> User:
    return await user_on(gateway, "bob@example.com")


# --- topics ---


async def test_topics_have_the_seeds_shape_and_crud_works(alice: User) -> None:
    created = await alice.topic("topic_1")
    assert set(created) == {"id", "userId", "name", "seriesId", "favorite", "createdAt", "updatedAt"}
    assert (created["userId"], created["name"], created["seriesId"], created["favorite"]) == (
        alice.id,
        "topic_1",
        1,
        False,
    )
    assert STAMP.fullmatch(created["createdAt"])
    assert created["createdAt"] == created["updatedAt"]
    other = await alice.topic("topic_2", series=7)
    assert (await alice.call("GET", "/chat/topic?seriesId=1")).json() == [created]
    assert (await alice.call("GET", "/chat/topic")).json() == [created, other]
    assert (await alice.call("GET", f"/chat/topic/{created['id']}")).json() == created

    patched = (
        await alice.call("PATCH", f"/chat/topic/{created['id']}", {"name": "renamed", "favorite": True})
    ).json()
    assert (patched["name"], patched["favorite"], patched["id"]) == ("renamed", True, created["id"])
    assert (await alice.call("GET", f"/chat/topic/{created['id']}")).json() == patched

    await alice.send(created["id"], "hello")
    deleted = await alice.call("DELETE", f"/chat/topic/{created['id']}")
    assert deleted.status_code == 200
    assert deleted.json()["id"] == created["id"]
    assert (await alice.call("GET", f"/chat/topic/{created['id']}")).status_code == 404
    store = alice.gateway.services.conversations.store
    assert await store.list_messages(created["id"]) == []  # nothing orphaned
    assert (await alice.call("GET", "/chat/topic")).json() == [other]


async def test_updated_at_moves_when_a_message_is_added(alice: User) -> None:
    created = await alice.topic()
    await asyncio.sleep(0.005)
    await alice.send(created["id"], "hi")
    after = (await alice.call("GET", f"/chat/topic/{created['id']}")).json()
    assert after["updatedAt"] > created["updatedAt"]
    assert after["createdAt"] == created["createdAt"]


# --- messages ---


async def test_a_reply_streams_as_plain_text_then_the_ids(alice: User, fake_deepseek: FakeUpstream) -> None:
    fake_deepseek.scenario = Scenario(content="你好人类。 How are you today?", token_delay=0.02)
    created = await alice.topic()
    body = {"seriesId": 1, "modelId": 1, "message": "你好", "enableMemory": True}
    chunks = []
    async with alice.stream("POST", f"/chat/topic/{created['id']}/message", body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        async for chunk in response.aiter_raw():
            chunks.append(chunk)
    assert len(chunks) >= 4  # chunk by chunk, as generated
    reply, meta = split(b"".join(chunks).decode())
    assert reply == "你好人类。 How are you today?"
    messages = await alice.messages(created["id"])
    assert meta == {
        "userMsgId": messages[0]["id"],
        "assistantMsgId": messages[1]["id"],
        "topicId": created["id"],
    }
    user, ai = messages
    assert set(user) == {
        "id",
        "userId",
        "topicId",
        "type",
        "message",
        "seriesId",
        "images",
        "createdAt",
        "updatedAt",
    }
    assert (user["type"], user["message"], user["images"], user["userId"], user["seriesId"]) == (
        0,
        "你好",
        [],
        alice.id,
        1,
    )
    assert (ai["type"], ai["message"], ai["images"]) == (1, reply, [])
    assert "status" not in ai


async def test_memory_decides_what_goes_upstream(alice: User, fake_deepseek: FakeUpstream) -> None:
    created = await alice.topic()
    fake_deepseek.scenario = Scenario(content="First answer.")
    await alice.send(created["id"], "my name is Ada")
    await alice.send(created["id"], "what is my name?", enableMemory=False)
    assert fake_deepseek.requests[-1].body["messages"] == [{"role": "user", "content": "what is my name?"}]
    await alice.send(created["id"], "and now?", enableMemory=True)
    assert [m["content"] for m in fake_deepseek.requests[-1].body["messages"]] == [
        "my name is Ada",
        "First answer.",
        "what is my name?",
        "First answer.",
        "and now?",
    ]


async def test_a_client_that_leaves_mid_reply_still_gets_it_stored(
    alice: User, fake_deepseek: FakeUpstream
) -> None:
    words = " ".join(f"w{i}" for i in range(60))
    fake_deepseek.scenario = Scenario(content=words, token_delay=0.01)
    created = await alice.topic()
    body = {"seriesId": 1, "modelId": 1, "message": "go", "enableMemory": True}
    async with alice.stream("POST", f"/chat/topic/{created['id']}/message", body) as response:
        async for _ in response.aiter_raw():
            break  # the first chunk, then the client goes
    assert fake_deepseek.disconnects == []
    async with asyncio.timeout(10):
        while (await alice.messages(created["id"]))[-1].get("status") == "generating":  # noqa: ASYNC110 - polls, as clients do
            await asyncio.sleep(0.05)
    assert (await alice.messages(created["id"]))[-1]["message"] == words


async def test_an_upstream_failure_before_the_reply_keeps_its_status_and_the_message(
    alice: User, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(status=503, message="Server overloaded")
    created = await alice.topic()
    response = await alice.call(
        "POST", f"/chat/topic/{created['id']}/message", {"seriesId": 1, "modelId": 1, "message": "hi"}
    )
    assert response.status_code == 503
    body = response.json()
    assert body["statusCode"] == 503
    assert "Server overloaded" in body["message"]
    user, ai = await alice.messages(created["id"])
    assert (user["message"], ai["status"]) == ("hi", "error")
    assert (body["userMsgId"], body["assistantMsgId"]) == (user["id"], ai["id"])


async def test_a_failure_mid_reply_is_in_the_metadata(alice: User, fake_deepseek: FakeUpstream) -> None:
    fake_deepseek.scenario = Scenario(content="one two three four five", disconnect_after=3)
    created = await alice.topic()
    reply, meta = await alice.send(created["id"], "go")
    assert reply == "one two"
    assert meta["status"] == "error"
    assert meta["error"]


# --- edit and regenerate ---


async def test_edit_changes_a_messages_text(alice: User, bob: User) -> None:
    created = await alice.topic()
    _, meta = await alice.send(created["id"], "typo here")
    response = await alice.call(
        "PATCH", f"/chat/topic/{created['id']}/message/{meta['userMsgId']}", {"message": "fixed"}
    )
    assert response.status_code == 200
    edited = response.json()
    assert (edited["id"], edited["message"], edited["type"]) == (meta["userMsgId"], "fixed", 0)
    assert (await alice.messages(created["id"]))[0]["message"] == "fixed"
    assert edited["updatedAt"] > edited["createdAt"]
    # Someone else's message, through their own topic or through this one: 404.
    theirs = await bob.topic()
    _, bobs = await bob.send(theirs["id"], "mine")
    response = await alice.call(
        "PATCH", f"/chat/topic/{created['id']}/message/{bobs['userMsgId']}", {"message": "x"}
    )
    assert response.status_code == 404
    assert (await bob.messages(theirs["id"]))[0]["message"] == "mine"


async def test_regenerating_a_reply_replaces_it_in_place_from_the_history_up_to_its_question(
    alice: User, fake_deepseek: FakeUpstream
) -> None:
    created = await alice.topic()
    fake_deepseek.script(Scenario(content="A1"), Scenario(content="A2"), Scenario(content="A1 again"))
    _, first = await alice.send(created["id"], "Q1")
    await alice.send(created["id"], "Q2")
    before = await alice.messages(created["id"])
    await asyncio.sleep(0.005)
    response = await alice.call(
        "POST",
        f"/chat/topic/{created['id']}/message/{first['assistantMsgId']}/regenerate",
        {"seriesId": 1, "modelId": 1, "enableGoogleResults": False, "enableMemory": True},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    reply, meta = split(response.text)
    assert reply == "A1 again"
    assert meta == {
        "userMsgId": first["userMsgId"],
        "assistantMsgId": first["assistantMsgId"],
        "topicId": created["id"],
    }
    assert fake_deepseek.requests[-1].body["messages"] == [{"role": "user", "content": "Q1"}]
    after = await alice.messages(created["id"])
    assert [m["id"] for m in after] == [m["id"] for m in before]
    assert [m["message"] for m in after] == ["Q1", "A1 again", "Q2", "A2"]
    assert after[1]["updatedAt"] > before[1]["updatedAt"]


async def test_regenerating_a_user_message_redoes_the_reply_after_it_or_creates_it(
    alice: User, fake_deepseek: FakeUpstream
) -> None:
    created = await alice.topic()
    fake_deepseek.script(Scenario(content="old"), Scenario(content="new"), Scenario(content="made"))
    _, meta = await alice.send(created["id"], "Q1")
    body = {"seriesId": 1, "modelId": 2, "enableMemory": True}
    response = await alice.call(
        "POST", f"/chat/topic/{created['id']}/message/{meta['userMsgId']}/regenerate", body
    )
    assert split(response.text)[1]["assistantMsgId"] == meta["assistantMsgId"]
    assert [m["message"] for m in await alice.messages(created["id"])] == ["Q1", "new"]
    assert fake_deepseek.requests[-1].body["model"] == "deepseek-v4-flash"  # the reasoner alias, as picked
    # A question left without a reply (stored by another client) gets one.
    store = alice.gateway.services.conversations.store
    from core import MessageDraft

    lone = await store.append_message(created["id"], MessageDraft(role="user", content="Q2"))
    response = await alice.call("POST", f"/chat/topic/{created['id']}/message/{lone.id}/regenerate", body)
    reply, made = split(response.text)
    assert (reply, made["userMsgId"]) == ("made", lone.id)
    assert [m["message"] for m in await alice.messages(created["id"])] == ["Q1", "new", "Q2", "made"]


# --- catalog and web search ---


async def test_the_catalog_lists_series_and_refuses_unknown_ones(alice: User) -> None:
    listed = (await alice.call("GET", "/chat/series")).json()
    assert [(s["id"], s["name"], [(m["id"], m["name"]) for m in s["models"]]) for s in listed] == [
        (1, "DeepSeek", [(1, "deepseek-chat"), (2, "Thinking")]),
        (7, "Local", [(3, "mock-chat")]),
    ]
    created = await alice.topic()
    url = f"/chat/topic/{created['id']}/message"
    response = await alice.call("POST", url, {"seriesId": 9, "modelId": 1, "message": "hi"})
    assert response.status_code == 400
    assert response.json()["message"] == "field 'seriesId': there is no series 9 (known: 1, 7)"
    response = await alice.call("POST", url, {"seriesId": 7, "modelId": 1, "message": "hi"})
    assert response.json()["message"] == "field 'modelId': series 7 has no model 1 (known: 3)"
    assert await alice.messages(created["id"]) == []


async def test_web_results_are_unavailable_without_a_search_plugin(
    alice: User, fake_deepseek: FakeUpstream
) -> None:
    created = await alice.topic()
    _, meta = await alice.send(created["id"], "news?", enableGoogleResults=True)
    assert meta["webSearch"] == "unavailable"
    _, meta = await alice.send(created["id"], "news?", enableGoogleResults=False)
    assert "webSearch" not in meta


class LibrarySearch(WebSearch):
    """A small search plugin: fixed results that name the query."""

    name = "library"

    async def search(self, query: str, limit: int) -> list[WebResult]:
        results = [
            WebResult(f"About {query}", f"https://example.org/{i}", f"Fact {i} on {query}.") for i in range(9)
        ]
        return results[:limit]


async def test_a_web_search_plugin_puts_its_results_into_the_context(
    topic_config: Callable[..., Path], gateway_factory: Callable[..., object], fake_deepseek: FakeUpstream
) -> None:
    plugin = SimpleNamespace(__name__="library_search", register_web_search=hookimpl(lambda: [LibrarySearch]))
    config = topic_config('\n[web_search]\nplugin = "library"\n')
    gateway: RunningGateway = await gateway_factory(config, extra_plugins=[plugin])  # type: ignore[assignment,misc]
    alice = await user_on(gateway, "alice@example.com")
    created = await alice.topic()
    _, meta = await alice.send(created["id"], "tides", enableGoogleResults=True)
    assert meta["webSearch"] == "used"
    system = fake_deepseek.requests[-1].body["messages"][0]
    assert system["role"] == "system"
    assert "About tides (https://example.org/0)" in system["content"]
    assert "Fact 4 on tides." in system["content"]
    assert "Fact 5 on tides." not in system["content"]  # web_results = 5
    assert fake_deepseek.requests[-1].body["messages"][-1] == {"role": "user", "content": "tides"}


# --- who sees what ---


ENDPOINTS = [
    ("GET", "/chat/topic/{t}", None),
    ("PATCH", "/chat/topic/{t}", {"name": "x"}),
    ("DELETE", "/chat/topic/{t}", None),
    ("POST", "/chat/topic/{t}/message", {"seriesId": 1, "modelId": 1, "message": "hi"}),
    ("GET", "/chat/topic/{t}/message", None),
    ("PATCH", "/chat/topic/{t}/message/{m}", {"message": "x"}),
    ("POST", "/chat/topic/{t}/message/{m}/regenerate", {"seriesId": 1, "modelId": 1}),
]


async def test_every_endpoint_needs_a_key(gateway: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as anonymous:
        extra = [("GET", "/chat/topic", None), ("POST", "/chat/topic", {}), ("GET", "/chat/series", None)]
        for method, path, body in [*ENDPOINTS, *extra]:
            url = path.format(t=1, m=1)
            for headers in ({}, {"Authorization": "Bearer sk-cg-nope"}, {"X-API-Key": "sk-cg-nope"}):
                response = await anonymous.request(method, url, json=body, headers=headers)
                assert response.status_code == 401, (method, url, headers)
                assert response.json()["statusCode"] == 401


async def test_another_users_topics_and_messages_are_404_everywhere(
    alice: User, bob: User, fake_deepseek: FakeUpstream
) -> None:
    mine = await alice.topic("alice's")
    _, meta = await alice.send(mine["id"], "private")
    theirs = await bob.topic("bob's")
    _, bobs = await bob.send(theirs["id"], "bob's own")
    before = len(fake_deepseek.requests)
    for method, path, body in ENDPOINTS:
        # Alice's topic with Bob's key; and Bob's topic with a message id of Alice's.
        for user, topic_id, message_id in (
            (bob, mine["id"], meta["userMsgId"]),
            (bob, theirs["id"], meta["userMsgId"]),
        ):
            if "{m}" not in path and topic_id == theirs["id"]:
                continue
            response = await user.call(method, path.format(t=topic_id, m=message_id), body)
            assert response.status_code == 404, (method, path, topic_id, response.text)
            assert response.json()["statusCode"] == 404
            assert response.json()["message"] in (
                f"topic {topic_id} not found",
                f"message {message_id} not found",
            )
    assert len(fake_deepseek.requests) == before
    assert (await alice.messages(mine["id"]))[0]["message"] == "private"
    assert (await alice.call("GET", "/chat/topic")).json()[0]["name"] == "alice's"
    assert [t["name"] for t in (await bob.call("GET", "/chat/topic")).json()] == ["bob's"]
    assert bobs["topicId"] == theirs["id"]


async def test_replies_are_charged_and_an_empty_balance_is_403(
    gateway: RunningGateway, fake_deepseek: FakeUpstream
) -> None:
    rich = await user_on(gateway, "rich@example.com")
    created = await rich.topic()
    fake_deepseek.scenario = Scenario(content="Paid.")
    await rich.send(created["id"], "hi")
    store = gateway.services.conversations.store
    async with asyncio.timeout(5):
        while any(e.kind == "reservation" for e in await store.list_ledger(rich.id)):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    charges = [e for e in await store.list_ledger(rich.id) if e.kind == "charge"]
    assert len(charges) == 1
    charge = charges[0]
    assert charge.amount == -(charge.prompt_tokens * 1000 + charge.completion_tokens * 2000)
    assert charge.key_id is not None

    poor = await user_on(gateway, "poor@example.com", funds=0)
    created = await poor.topic()
    response = await poor.call(
        "POST", f"/chat/topic/{created['id']}/message", {"seriesId": 1, "modelId": 1, "message": "hi"}
    )
    assert response.status_code == 403
    assert response.json() == {
        "statusCode": 403,
        "message": "your balance is used up; ask the operator to top it up",
    }
    assert await poor.messages(created["id"]) == []


# --- rate limits ---


async def limited_user(gateway: RunningGateway, email: str, **limits: int) -> User:
    user = await user_on(gateway, email)
    [key] = await gateway.services.accounts.list_keys(user.id)
    await gateway.services.accounts.set_limits(key.id, RateLimits(**limits))
    return user


def assert_limited(response: httpx.Response, what: str) -> None:
    assert response.status_code == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert response.json()["statusCode"] == 429
    assert response.json()["message"].startswith(f"rate limit reached: {what} for this key; retry in ")


async def test_topic_messages_count_against_their_keys_requests_per_minute(
    gateway: RunningGateway, fake_deepseek: FakeUpstream
) -> None:
    user = await limited_user(gateway, "counted@example.com", requests_per_minute=2)
    created = await user.topic()
    fake_deepseek.scenario = Scenario(content="ok")
    await user.send(created["id"], "one")
    await user.send(created["id"], "two")
    body = {"seriesId": 1, "modelId": 1, "message": "three"}
    assert_limited(
        await user.call("POST", f"/chat/topic/{created['id']}/message", body), "2 requests per minute"
    )
    messages = await user.messages(created["id"])
    assert [(m["type"], m["message"]) for m in messages] == [(0, "one"), (1, "ok"), (0, "two"), (1, "ok")]
    # Regenerating is a request too.
    response = await user.call(
        "POST", f"/chat/topic/{created['id']}/message/{messages[3]['id']}/regenerate", PICK
    )
    assert_limited(response, "2 requests per minute")
    assert await user.messages(created["id"]) == messages
    assert len(fake_deepseek.requests) == 2


async def test_the_summaries_of_a_key_holders_topic_are_that_keys_usage(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., object]
) -> None:
    # Keyless usage is what an email's quota counts: a key holder's summaries must not be it.
    small = PRICED_MODELS.replace(
        "context_tokens = 65536\nmax_output_tokens = 4096", "context_tokens = 600\nmax_output_tokens = 100"
    )
    config = write_config(
        deepseek_config(fake_deepseek.url, extra="max_retries = 0") + small,
        replace={"[surfaces.topic_chat]\n": CATALOG},
    )
    gateway: RunningGateway = await gateway_factory(config)  # type: ignore[assignment,misc]
    user = await user_on(gateway, "long@example.com")
    [key] = await gateway.services.accounts.list_keys(user.id)
    created = await user.topic()
    fake_deepseek.scenario = Scenario(content="word " * 60)
    for turn in range(6):
        await user.send(created["id"], f"question {turn} " + "x" * 80)
    store = gateway.services.billing.store
    async with asyncio.timeout(10):  # a summary settles right after it ends; charges under leases soon after
        while True:
            used = [e for e in await store.list_ledger(user.id) if e.kind != "topup"]
            if used and all(e.kind in ("charge", "released") for e in used):
                break
            await asyncio.sleep(0.02)
    summaries = [e for e in used if e.outcome == "summary"]
    assert summaries, [e.outcome for e in used]
    assert all(e.key_id == key.id for e in used)


async def test_topic_and_v1_requests_of_a_key_share_one_count(
    gateway: RunningGateway, fake_deepseek: FakeUpstream
) -> None:
    user = await limited_user(gateway, "shared@example.com", requests_per_minute=2)
    created = await user.topic()
    fake_deepseek.scenario = Scenario(content="ok")
    completion = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}
    assert (await user.call("POST", "/v1/chat/completions", completion)).status_code == 200
    await user.send(created["id"], "one")
    body = {**PICK, "message": "two"}
    assert_limited(
        await user.call("POST", f"/chat/topic/{created['id']}/message", body), "2 requests per minute"
    )
    v1 = await user.call("POST", "/v1/chat/completions", completion)
    assert v1.status_code == 429
    assert v1.json()["error"]["code"] == "rate_limit_exceeded"


async def test_the_configured_default_limits_hold_for_topic_chat_too(
    topic_config: Callable[..., Path], gateway_factory: Callable[..., object], fake_deepseek: FakeUpstream
) -> None:
    path = topic_config()  # every key's defaults are set where /v1's are
    limited = "[surfaces.openai_compat]\nconcurrent_requests = 1\n"
    path.write_text(path.read_text().replace("[surfaces.openai_compat]\n", limited))
    gateway: RunningGateway = await gateway_factory(path)  # type: ignore[assignment,misc]
    user = await user_on(gateway, "slow@example.com")
    created = await user.topic()
    fake_deepseek.scenario = Scenario(content=" ".join(f"w{i}" for i in range(300)), token_delay=0.01)
    first = await user.topic("other")
    async with user.stream(
        "POST", f"/chat/topic/{first['id']}/message", {**PICK, "message": "long"}
    ) as running:
        assert running.status_code == 200
        body = {**PICK, "message": "meanwhile"}
        response = await user.call("POST", f"/chat/topic/{created['id']}/message", body)
        assert_limited(response, "1 concurrent requests")
        await running.aread()
    assert await user.messages(created["id"]) == []


# --- bad input ---


SEND = "/chat/topic/{t}/message"
PICK = {"seriesId": 1, "modelId": 1}


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [
        ("POST", "/chat/topic", {"seriesId": 1}, "field 'name' is missing or empty"),
        ("POST", "/chat/topic", {"name": "x"}, "field 'seriesId' must be an integer, got None"),
        ("POST", "/chat/topic", {"name": "x", "seriesId": "1"}, "field 'seriesId' must be an integer, got '1'"),  # noqa: E501
        ("POST", "/chat/topic", b"{broken", "the request body is not valid JSON (JSON is malformed: object keys must be strings (byte 1))"),  # noqa: E501
        ("GET", "/chat/topic/abc", None, "path parameter 'id' must be a positive integer, got 'abc'"),
        ("GET", "/chat/topic?seriesId=x", None, "query parameter 'seriesId' must be a positive integer, got 'x'"),  # noqa: E501
        ("PATCH", "/chat/topic/{t}", {"favorite": "yes"}, "field 'favorite' must be true or false, got 'yes'"),  # noqa: E501
        ("POST", SEND, PICK, "field 'message' is missing or empty"),
        ("POST", SEND, {**PICK, "message": " "}, "field 'message' is missing or empty"),
        ("POST", SEND, {**PICK, "message": "x" * 101}, "field 'message' is longer than 100 characters"),
        ("POST", SEND, {"modelId": 1, "message": "hi"}, "field 'seriesId' must be an integer, got None"),
        ("POST", SEND, {**PICK, "message": "hi", "enableMemory": 1}, "field 'enableMemory' must be true or false, got 1"),  # noqa: E501
        ("POST", "/chat/topic/1x/message", {**PICK, "message": "hi"}, "path parameter 'topic_id' must be a positive integer, got '1x'"),  # noqa: E501
        ("PATCH", SEND + "/x", {"message": "hi"}, "path parameter 'messageId' must be a positive integer, got 'x'"),  # noqa: E501
    ],
)  # fmt: skip
async def test_bad_input_is_400_naming_the_field_and_writes_nothing(
    alice: User, fake_deepseek: FakeUpstream, method: str, path: str, body: Any, message: str
) -> None:
    created = await alice.topic()
    url = path.format(t=created["id"])
    if isinstance(body, bytes):
        headers = {**alice.headers, "Content-Type": "application/json"}
        response = await alice.gateway.client.request(method, url, content=body, headers=headers)
    else:
        response = await alice.call(method, url, body)
    assert response.status_code == 400, response.text
    assert response.json() == {"statusCode": 400, "message": message}
    assert (await alice.call("GET", "/chat/topic")).json() == [created]
    assert await alice.messages(created["id"]) == []
    assert fake_deepseek.requests == []


async def test_regenerate_searches_the_web_for_the_question_not_the_old_reply(
    topic_config: Callable[..., Path], gateway_factory: Callable[..., object], fake_deepseek: FakeUpstream
) -> None:
    plugin = SimpleNamespace(__name__="library_search", register_web_search=hookimpl(lambda: [LibrarySearch]))
    gateway: RunningGateway = await gateway_factory(  # type: ignore[assignment,misc]
        topic_config('\n[web_search]\nplugin = "library"\n'), extra_plugins=[plugin]
    )
    alice = await user_on(gateway, "alice@example.com")
    created = await alice.topic()
    fake_deepseek.scenario = Scenario(content="The old answer.")
    _, meta = await alice.send(created["id"], "tides")
    body = {"seriesId": 1, "modelId": 1, "enableGoogleResults": True, "enableMemory": True}
    response = await alice.call(
        "POST", f"/chat/topic/{created['id']}/message/{meta['assistantMsgId']}/regenerate", body
    )
    assert split(response.text)[1]["webSearch"] == "used"
    system = fake_deepseek.requests[-1].body["messages"][0]["content"]
    assert "About tides" in system
    assert "old answer" not in system


async def test_a_reply_still_generating_cannot_be_edited(alice: User, fake_deepseek: FakeUpstream) -> None:
    fake_deepseek.scenario = Scenario(content=" ".join(f"w{i}" for i in range(200)), token_delay=0.01)
    created = await alice.topic()
    body = {"seriesId": 1, "modelId": 1, "message": "go"}
    async with alice.stream("POST", f"/chat/topic/{created['id']}/message", body) as response:
        async for _ in response.aiter_raw():
            break
        [_, reply] = await alice.messages(created["id"])
        assert reply["status"] == "generating"
        edit = await alice.call(
            "PATCH", f"/chat/topic/{created['id']}/message/{reply['id']}", {"message": "x"}
        )
        assert edit.status_code == 409
        assert edit.json()["message"].startswith(f"message {reply['id']} is still being generated")


@pytest.mark.parametrize("raw", ["²", "99999999999999999999999", "-1", "1.0"])
async def test_ids_that_are_not_plain_integers_are_400(alice: User, raw: str) -> None:
    response = await alice.call("GET", f"/chat/topic/{raw}")
    assert response.status_code == 400
    assert response.json()["message"] == f"path parameter 'id' must be a positive integer, got {raw!r}"
    response = await alice.call("GET", f"/chat/topic?seriesId={raw}")
    assert response.json()["message"] == f"query parameter 'seriesId' must be a positive integer, got {raw!r}"


async def test_editing_a_later_message_does_not_stop_a_reply_regenerated_in_place(
    alice: User, fake_deepseek: FakeUpstream
) -> None:
    """The fence against a newer question (a reply superseded in another process) looks only at
    messages added after the reply began: later messages edited meanwhile are no newer question."""
    created = await alice.topic()
    fake_deepseek.script(
        Scenario(content="A1"),
        Scenario(content="A2"),
        Scenario(content=" ".join(f"w{i}" for i in range(120)), token_delay=0.01),
    )
    _, first = await alice.send(created["id"], "Q1")
    _, second = await alice.send(created["id"], "Q2")
    path = f"/chat/topic/{created['id']}/message"
    pick = {"seriesId": 1, "modelId": 1, "enableMemory": True}
    regenerating = asyncio.create_task(
        alice.call("POST", f"{path}/{first['assistantMsgId']}/regenerate", pick)
    )

    async def growing() -> bool:
        return "w3" in (await alice.messages(created["id"]))[1]["message"]

    async with asyncio.timeout(10):
        while not await growing():  # noqa: ASYNC110 - what the other request wrote, polled
            await asyncio.sleep(0.02)
    edited = await alice.call("PATCH", f"{path}/{second['userMsgId']}", {"message": "Q2, edited"})
    assert edited.status_code == 200
    reply, _ = split((await regenerating).text)
    assert reply.endswith("w119")  # it ran to its end
