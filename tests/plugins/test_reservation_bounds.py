"""A reservation is an upper bound: against an upstream that ignores ``max_tokens``, over real HTTP.

Every upstream request asks for at most the model's ``max_output_tokens``; a reply
that runs past it is cut there (``finish_reason`` "length", the upstream closed);
the charge never passes the worst case reserved, so a balance that covers exactly
one worst case ends at zero, not below; a request that cannot fit the model's
context is refused before anything is reserved.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from core import LedgerDraft, LedgerEntry
from core.testing.fake_upstream import FakeUpstream, Scenario
from core.tokens import estimate_tokens
from core.types import ChatMessage, ChatRequest
from plugins.openai_compat import wire
from tests.conftest import RunningGateway, deepseek_config

CAP = 64
MODEL = f"""
[models.deepseek-chat]
provider = "deepseek"
input_price = 1000
output_price = 2000
context_tokens = 4096
max_output_tokens = {CAP}
vision = true
"""
TOPICS = """[surfaces.topic_chat]
[[surfaces.topic_chat.series]]
id = 1
name = "DeepSeek"
models = [{ id = 1, model = "deepseek-chat" }]
"""
RUNAWAY = Scenario(ignore_max_tokens=True, tokens=2000)
"""An upstream that streams far more than it was asked for, and counts it all in its usage."""


class Holder:
    """A key holder of a gateway in front of the fake DeepSeek."""

    def __init__(self, gateway: RunningGateway, key: str, user_id: int) -> None:
        self.gateway = gateway
        self.key = key
        self.user_id = user_id
        self.headers = {"Authorization": f"Bearer {key}"}
        self.sdk = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=30)

    def worst_case(self, body: dict[str, Any]) -> int:
        """What the gateway reserves for this /v1/chat/completions body."""
        services = self.gateway.services
        request = wire.parse(json.dumps(body).encode()).request
        return services.billing.worst_case(services.catalog.route(request.model), request)

    async def fund(self, amount: int) -> None:
        await self.gateway.services.billing.top_up(self.user_id, amount)

    async def balance(self) -> int:
        return (await self.gateway.services.accounts.get_user(self.user_id)).balance

    async def ledger(self) -> list[LedgerEntry]:
        return await self.gateway.services.billing.store.list_ledger(self.user_id)

    async def charges(self, count: int = 1) -> list[LedgerEntry]:
        """The charges once ``count`` have been settled (settlement follows the answer closely)."""
        async with asyncio.timeout(10):
            while True:
                entries = await self.ledger()
                charges = [e for e in entries if e.kind == "charge"]
                if len(charges) >= count and not any(e.kind == "reservation" for e in entries):
                    return charges
                await asyncio.sleep(0.01)


@pytest.fixture
async def holder(
    request: pytest.FixtureRequest,
    fake_deepseek: FakeUpstream,
    write_config: Callable[..., Path],
    gateway_factory: Callable[..., object],
) -> AsyncIterator[Holder]:
    """A key holder; the upstream is a ``deepseek`` instance, or the plugin ``request.param`` names."""
    provider = deepseek_config(fake_deepseek.url, extra="max_retries = 0")
    plugin = getattr(request, "param", "deepseek")
    provider = provider.replace('plugin = "deepseek"', f'plugin = "{plugin}"')
    config = write_config(provider + MODEL, replace={"[surfaces.topic_chat]\n": TOPICS})
    gateway: RunningGateway = await gateway_factory(config)  # type: ignore[assignment,misc]
    key, secret = await gateway.services.accounts.create_key("bound@example.com")
    holder = Holder(gateway, secret, key.user_id)
    yield holder
    await holder.sdk.close()


HI = [{"role": "user", "content": "Hi"}]


async def test_a_whole_reply_past_its_cap_is_cut_and_charged_no_more_than_reserved(
    holder: Holder, fake_deepseek: FakeUpstream
) -> None:
    body = {"model": "deepseek-chat", "messages": HI, "max_tokens": 100_000}
    worst = holder.worst_case(body)
    await holder.fund(worst)  # exactly one worst case
    fake_deepseek.scenario = RUNAWAY
    answer = await holder.sdk.chat.completions.create(model="deepseek-chat", messages=HI, max_tokens=100_000)  # type: ignore[call-overload]
    assert fake_deepseek.requests[-1].body["max_tokens"] == CAP  # asked 100000: lowered to the model's
    choice = answer.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content
    assert estimate_tokens(choice.message.content) <= 2 * CAP  # the JSON reply held 2000 tokens
    assert answer.usage is not None
    assert answer.usage.completion_tokens == CAP
    [charge] = await holder.charges()
    assert -charge.amount <= worst
    assert await holder.balance() == worst + charge.amount >= 0


@pytest.mark.parametrize("holder", ["openai_compatible", "deepseek"], indirect=True)
@pytest.mark.parametrize(
    ("sent", "upstream"),
    [
        ({}, {"max_tokens": CAP}),
        ({"max_tokens": 10}, {"max_tokens": 10}),
        ({"max_tokens": 100_000}, {"max_tokens": CAP}),
        ({"max_completion_tokens": 100_000}, {"max_completion_tokens": CAP}),
        ({"max_completion_tokens": 10}, {"max_completion_tokens": 10}),
        ({"max_completion_tokens": 20, "max_tokens": 10}, {"max_completion_tokens": 10}),
        ({"max_completion_tokens": 10, "max_tokens": 100_000}, {"max_completion_tokens": 10}),
    ],
)
async def test_the_cap_goes_upstream_under_the_name_the_client_used_and_is_what_is_reserved(
    holder: Holder, fake_deepseek: FakeUpstream, sent: dict[str, int], upstream: dict[str, int]
) -> None:
    """An OpenAI-compatible server gets the cap under the client's name for it (OpenAI's
    reasoning models refuse max_tokens); DeepSeek, whose API knows only max_tokens, gets that."""
    if holder.gateway.services.catalog.route("deepseek-chat").provider.name == "deepseek":
        upstream = {"max_tokens": next(iter(upstream.values()))}
    body = {"model": "deepseek-chat", "messages": HI, **sent}
    [cap] = upstream.values()
    services = holder.gateway.services
    request = wire.parse(json.dumps(body).encode()).request
    assert services.catalog.route("deepseek-chat").output_tokens(request) == cap  # what is reserved
    # Funds for exactly that worst case: a reservation for more output would be refused.
    await holder.fund(holder.worst_case(body))
    fake_deepseek.scenario = Scenario(content="Short.")
    # The SDK's own fields (max_completion_tokens is its current one), as a client sends them.
    answer = await holder.sdk.chat.completions.create(model="deepseek-chat", messages=HI, **sent)  # type: ignore[call-overload]
    assert answer.choices[0].message.content == "Short."
    sent_upstream = fake_deepseek.requests[-1].body
    assert {
        k: v for k, v in sent_upstream.items() if k in ("max_tokens", "max_completion_tokens")
    } == upstream
    [charge] = await holder.charges()
    assert await holder.balance() == holder.worst_case(body) + charge.amount >= 0


async def test_a_streamed_reply_past_its_cap_is_cut_and_the_upstream_closed(
    holder: Holder, fake_deepseek: FakeUpstream
) -> None:
    body = {"model": "deepseek-chat", "messages": HI, "stream": True}
    worst = holder.worst_case(body)
    await holder.fund(worst)
    # Past its 200th event the upstream sends nothing until the client goes: only a cut ends it.
    fake_deepseek.scenario = Scenario(ignore_max_tokens=True, tokens=5000, stall_after=200)
    stream = await holder.sdk.chat.completions.create(model="deepseek-chat", messages=HI, stream=True)
    chunks = [chunk async for chunk in stream]
    assert "max_tokens" in fake_deepseek.requests[-1].body  # the client sent none: the model's
    assert fake_deepseek.requests[-1].body["max_tokens"] == CAP
    await fake_deepseek.wait_for_disconnect()
    pieces = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert 0 < len(pieces) <= CAP
    assert chunks[-1].choices[0].finish_reason == "length"
    [charge] = await holder.charges()
    assert -charge.amount <= worst
    assert await holder.balance() >= 0


async def test_usage_counted_past_the_reservation_is_charged_the_reservation(
    holder: Holder, fake_deepseek: FakeUpstream
) -> None:
    body = {"model": "deepseek-chat", "messages": HI}
    worst = holder.worst_case(body)
    await holder.fund(worst)
    fake_deepseek.scenario = Scenario(content="Hello.", completion_tokens=1_000_000)
    answer = await holder.sdk.chat.completions.create(model="deepseek-chat", messages=HI)
    assert answer.choices[0].message.content == "Hello."
    [charge] = await holder.charges()
    assert charge.completion_tokens == 1_000_000  # recorded as the upstream counted it
    assert -charge.amount == worst  # charged what was reserved, no more
    assert await holder.balance() == 0


async def test_a_leased_request_is_charged_no_more_than_its_worst_case(
    holder: Holder, fake_deepseek: FakeUpstream
) -> None:
    body = {"model": "deepseek-chat", "messages": HI, "stream": True}
    worst = holder.worst_case(body)
    funds = 100 * worst  # enough for the key's requests to be admitted under a lease
    await holder.fund(funds)
    fake_deepseek.scenario = RUNAWAY
    stream = await holder.sdk.chat.completions.create(model="deepseek-chat", messages=HI, stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices[0].finish_reason == "length"
    [charge] = await holder.charges()
    assert any(e.kind in ("lease", "released") for e in await holder.ledger())
    assert -charge.amount <= worst


async def test_a_topic_chat_reply_past_its_cap_is_cut_and_charged_no_more_than_reserved(
    holder: Holder, fake_deepseek: FakeUpstream
) -> None:
    services = holder.gateway.services
    route = services.catalog.route("deepseek-chat")
    question = ChatRequest(model="deepseek-chat", messages=(ChatMessage(role="user", content="hello"),))
    worst = services.billing.worst_case(route, question)
    await holder.fund(worst)
    client = holder.gateway.client
    topic = await client.post("/chat/topic", json={"name": "t", "seriesId": 1}, headers=holder.headers)
    assert topic.status_code == 200, topic.text
    fake_deepseek.scenario = RUNAWAY
    sent = {"seriesId": 1, "modelId": 1, "message": "hello", "enableMemory": True}
    answer = await client.post(f"/chat/topic/{topic.json()['id']}/message", json=sent, headers=holder.headers)
    assert answer.status_code == 200, answer.text
    assert fake_deepseek.requests[-1].body["max_tokens"] == CAP
    reply = answer.text.rpartition("¦")[0]
    assert reply
    assert reply.count(" ") <= CAP  # the fake's pieces are words
    [charge] = await holder.charges()
    assert charge.completion_tokens == CAP
    assert -charge.amount <= worst
    assert await holder.balance() >= 0


async def test_a_request_that_cannot_fit_the_context_is_400_and_reserves_nothing(
    holder: Holder, fake_deepseek: FakeUpstream
) -> None:
    await holder.fund(10**12)
    before = await holder.ledger()
    # Its text alone fits 4096 tokens; its images, tools and extra fields do not.
    parts: list[dict[str, Any]] = [{"type": "text", "text": "word " * 20} for _ in range(40)]
    parts += [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}] * 2
    tools = [
        {
            "type": "function",
            "function": {"name": f"tool_{i}", "description": "does a thing " * 20, "parameters": {}},
        }
        for i in range(10)
    ]
    body = {
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": parts}],
        "tools": tools,
        "metadata": {"note": "x" * 2000},
    }
    response = await holder.gateway.client.post("/v1/chat/completions", json=body, headers=holder.headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    )
    assert "4096" in error["message"]
    with pytest.raises(openai.BadRequestError):  # the SDK sees the same
        await holder.sdk.chat.completions.create(**body)
    assert fake_deepseek.requests == []
    assert await holder.ledger() == before


async def test_user_balance_shows_a_negative_balance_as_it_is(holder: Holder) -> None:
    store = holder.gateway.services.billing.store
    # Left negative by a settlement before this version capped them at the reservation.
    await store.post_ledger(LedgerDraft(user_id=holder.user_id, amount=-1_500_000, kind="charge"), floor=None)
    response = await holder.gateway.client.get("/user/balance", headers=holder.headers)
    assert response.status_code == 200
    info = response.json()
    assert info["is_available"] is False
    assert info["balance_infos"][0]["total_balance"] == "-1.500000"
