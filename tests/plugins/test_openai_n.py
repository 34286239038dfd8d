"""``n > 1`` on POST /v1/chat/completions: one upstream request per choice, each reserved and
charged on its own ledger entry, all or none; streamed choices interleave by index."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from core import RateLimits
from core.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import PRICED_MODELS, RunningGateway, deepseek_config, funded_key
from tests.conftest import settled as settled_ledger
from tests.plugins.test_openai_chat import Client, settled

HI = [{"role": "user", "content": "Give me a name"}]


@pytest.fixture
async def client(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., object]
) -> AsyncIterator[Client]:
    config = write_config(deepseek_config(fake_deepseek.url, extra="max_retries = 0") + PRICED_MODELS)
    gateway: RunningGateway = await gateway_factory(config)  # type: ignore[assignment,misc]
    client = Client(gateway, *await funded_key(gateway))
    yield client
    await client.sdk.close()


def events(text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line.removeprefix("data: "))
        for line in text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


async def test_sdk_whole_reply_has_n_choices_each_charged_once(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.script(Scenario(content="Ada"), Scenario(content="Grace"), Scenario(content="Linus"))
    answer = await client.sdk.chat.completions.create(model="deepseek-chat", messages=HI, n=3)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert {c.message.content for c in answer.choices} == {"Ada", "Grace", "Linus"}
    assert all(c.finish_reason == "stop" for c in answer.choices)
    # One upstream request per choice, none of them asking for n.
    assert len(fake_deepseek.requests) == 3
    assert all("n" not in r.body for r in fake_deepseek.requests)
    charges = await settled(client, 3)
    assert len(charges) == 3
    assert all(c.outcome == "complete" and c.amount < 0 for c in charges)
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == sum(c.prompt_tokens for c in charges)
    assert answer.usage.completion_tokens == sum(c.completion_tokens for c in charges)
    assert answer.system_fingerprint is not None


async def test_sdk_stream_interleaves_choices_by_index_and_sums_usage(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.script(Scenario(content="Alpha beta", token_delay=0.01), Scenario(content="Gamma delta"))
    stream = await client.sdk.chat.completions.create(
        model="deepseek-chat", messages=HI, n=2, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    # Every choice's role chunk first, in ascending order (the SDK's helper appends a choice there).
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in chunks[:2]] == [
        (0, "assistant"),
        (1, "assistant"),
    ]
    texts: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, str | None] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert sorted(texts.values()) == ["Alpha beta", "Gamma delta"]
    assert finishes == {0: "stop", 1: "stop"}
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1
    assert usage_chunks[0] is chunks[-1]
    assert chunks[-1].choices == []
    charges = await settled(client, 2)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == sum(c.prompt_tokens + c.completion_tokens for c in charges)


async def test_sdk_stream_helper_gathers_every_choice(client: Client, fake_deepseek: FakeUpstream) -> None:
    fake_deepseek.script(Scenario(content="First"), Scenario(content="Second"))
    async with client.sdk.chat.completions.stream(model="deepseek-chat", messages=HI, n=2) as stream:
        final = await stream.get_final_completion()
    assert sorted(c.message.content or "" for c in final.choices) == ["First", "Second"]
    assert [c.index for c in final.choices] == [0, 1]


async def test_a_balance_that_cannot_cover_every_choice_starts_none(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    key, secret = await client.gateway.services.accounts.create_key("poor@example.com")
    # One choice of max_tokens 100 holds about 100 * 2000 + prompt * 1000 micro-credits: this covers one.
    await client.gateway.services.billing.top_up(key.user_id, 300_000)
    poor = Client(client.gateway, secret, key.user_id)
    try:
        await _refused_then_one_fits(poor, client, fake_deepseek, key.user_id)
    finally:
        await poor.sdk.close()


async def _refused_then_one_fits(
    poor: Client, client: Client, fake_deepseek: FakeUpstream, user_id: int
) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await poor.sdk.chat.completions.create(model="deepseek-chat", messages=HI, n=2, max_tokens=100)
    assert caught.value.code == "insufficient_user_quota"
    assert "n = 2" in str(caught.value)
    assert fake_deepseek.requests == []
    ledger = await settled_ledger(client.gateway, user_id)
    # Given back unsent and uncounted: "released" does not count in the key's rate window.
    assert [(e.kind, e.amount, e.outcome) for e in ledger if e.kind != "topup"] == [
        ("released", 0, "not_sent")
    ]
    assert (await client.gateway.services.accounts.get_user(user_id)).balance == 300_000
    # One choice fits.
    answer = await poor.sdk.chat.completions.create(model="deepseek-chat", messages=HI, n=1, max_tokens=100)
    assert len(answer.choices) == 1


async def test_a_concurrency_limit_below_n_refuses_before_anything_goes_upstream(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    key = await client.gateway.services.accounts.authenticate_headers(
        {"authorization": f"Bearer {client.key}"}
    )
    assert key.key is not None
    await client.gateway.services.accounts.set_limits(key.key.id, RateLimits(concurrent_requests=2))
    # It could never be admitted: a 400 naming n and the limit (a 429 would be retried for ever).
    with pytest.raises(openai.BadRequestError) as caught:
        await client.sdk.chat.completions.create(model="deepseek-chat", messages=HI, n=3)
    assert caught.value.code == "n_above_limit"
    assert "concurrent_requests is 2" in str(caught.value)
    assert (caught.value.body or {}).get("param") == "n"  # type: ignore[union-attr]
    assert fake_deepseek.requests == []
    assert [e for e in await client.ledger() if e.kind != "topup"] == []  # nothing reserved
    before = await client.balance()
    answer = await client.sdk.chat.completions.create(model="deepseek-chat", messages=HI, n=2)
    assert len(answer.choices) == 2
    assert await client.balance() < before


async def test_a_choice_refused_upstream_fails_the_reply_and_stops_the_others(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.script(
        Scenario(status=400, message="Invalid request"), Scenario(tokens=200, token_delay=0.05)
    )
    response = await client.post({"model": "deepseek-chat", "messages": HI, "n": 2})
    assert response.status_code == 400
    assert "Invalid request" in response.json()["error"]["message"]
    charges = await settled(client, 2)
    assert len(charges) == 2
    assert {c.outcome for c in charges} <= {"error", "cancelled"}
    assert all(c.completion_tokens < 200 for c in charges)
    assert [c.amount for c in charges] == [0, 0]  # a refused request costs nothing


@pytest.mark.parametrize("stream", [True, False])
async def test_a_refused_reply_charges_nothing_for_a_choice_that_finished(
    client: Client, fake_deepseek: FakeUpstream, stream: bool
) -> None:
    # The first choice finishes (5 tokens) well before the second is refused: the client gets a 429
    # all the same, so neither is charged (before the fix the finished one was).
    fake_deepseek.script(Scenario(tokens=5), Scenario(status=429, retry_after="1", delay=0.3))
    response = await client.post({"model": "deepseek-chat", "messages": HI, "n": 2, "stream": stream})
    assert response.status_code == 429
    charges = await settled(client, 2)
    # Whether the first had finished (outcome "complete") or was stopped by the refusal, it is free.
    assert [c.amount for c in charges] == [0, 0]
    assert await client.balance() == 100_000_000


async def test_n_above_requests_per_minute_or_tokens_per_minute_is_a_400_naming_n(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    key = await client.gateway.services.accounts.authenticate_headers(
        {"authorization": f"Bearer {client.key}"}
    )
    assert key.key is not None
    for limits, named in (
        (RateLimits(requests_per_minute=2), "requests_per_minute is 2"),
        (RateLimits(tokens_per_minute=20), "tokens_per_minute is 20"),
    ):
        await client.gateway.services.accounts.set_limits(key.key.id, limits)
        response = await client.post({"model": "deepseek-chat", "messages": HI, "n": 3})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "n"
        assert named in response.json()["error"]["message"]
    assert fake_deepseek.requests == []
    assert [e for e in await client.ledger() if e.kind != "topup"] == []


async def test_reservations_given_back_for_a_refused_n_do_not_use_up_the_minute(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    key, secret = await client.gateway.services.accounts.create_key("tight@example.com")
    await client.gateway.services.accounts.set_limits(key.id, RateLimits(requests_per_minute=3))
    await client.gateway.services.billing.top_up(key.user_id, 300_000)  # covers one choice of 100 tokens
    tight = Client(client.gateway, secret, key.user_id)
    try:
        with pytest.raises(openai.PermissionDeniedError):
            await tight.sdk.chat.completions.create(model="deepseek-chat", messages=HI, n=2, max_tokens=100)
        await client.gateway.services.billing.top_up(key.user_id, 10_000_000)
        # The first choice reserved and given back no longer counts: all three of the minute are left.
        answer = await tight.sdk.chat.completions.create(
            model="deepseek-chat", messages=HI, n=3, max_tokens=100
        )
        assert len(answer.choices) == 3
    finally:
        await tight.sdk.close()


async def test_a_choice_failing_mid_stream_ends_the_stream_with_an_error(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.script(
        Scenario(tokens=20, token_delay=0.01, disconnect_after=4), Scenario(tokens=200, token_delay=0.02)
    )

    # Whether the failure comes before every choice's first event (a status code) or after (an
    # error event in the stream) is the upstream's timing: both outcomes are checked for what they
    # promise, so the test holds either way.
    async def read_all() -> None:
        stream = await client.sdk.chat.completions.create(
            model="deepseek-chat", messages=HI, n=2, stream=True
        )
        async for _ in stream:
            pass

    with pytest.raises(openai.APIError) as caught:
        await read_all()
    charges = await settled(client, 2)
    assert len(charges) == 2
    assert all(c.completion_tokens < 200 for c in charges)
    if isinstance(caught.value, openai.APIStatusError):  # answered with a status: nothing charged
        assert [c.amount for c in charges] == [0, 0]
    else:  # the stream began: each choice is charged what it produced
        assert all(c.amount < 0 for c in charges if c.completion_tokens > 0)


async def test_a_client_leaving_cancels_every_choice(client: Client, fake_deepseek: FakeUpstream) -> None:
    fake_deepseek.scenario = Scenario(tokens=200, token_delay=0.05)
    body = {"model": "deepseek-chat", "messages": HI, "stream": True, "n": 2}
    headers = {"Authorization": f"Bearer {client.key}"}
    async with (
        httpx.AsyncClient(base_url=client.gateway.url) as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response,
    ):
        received = 0
        async for line in response.aiter_lines():
            if '"content":"' in line and '"content":""' not in line:
                received += 1
            if received >= 4:
                break
    await fake_deepseek.wait_for_disconnect(timeout=5)
    await fake_deepseek.wait_for_disconnect(timeout=5)
    charges = await settled(client, 2)
    assert [c.outcome for c in charges] == ["cancelled", "cancelled"]
    assert all(0 < c.completion_tokens < 200 for c in charges)


@pytest.mark.parametrize("n", [0, 9, -1, "2", 1.5, True])
async def test_bad_n_answers_400_naming_it(client: Client, fake_deepseek: FakeUpstream, n: Any) -> None:
    response = await client.post({"model": "deepseek-chat", "messages": HI, "n": n})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "n"
    assert "'n'" in error["message"]
    assert fake_deepseek.requests == []
    assert [e.kind for e in await client.ledger()] == ["topup"]


async def test_n_with_logprobs_gives_each_choice_its_own(client: Client, fake_deepseek: FakeUpstream) -> None:
    fake_deepseek.script(Scenario(content="One"), Scenario(content="Two words"))
    answer = (await client.post({"model": "deepseek-chat", "messages": HI, "n": 2, "logprobs": True})).json()
    for choice in answer["choices"]:
        tokens = choice["logprobs"]["content"]
        assert "".join(t["token"] for t in tokens) == choice["message"]["content"]


async def test_mock_n_offline(gateway: RunningGateway) -> None:
    key, secret = await gateway.services.accounts.create_key("mock@example.com")
    await gateway.services.billing.top_up(key.user_id, 100_000_000)
    client = Client(gateway, secret, key.user_id)
    async with client.sdk:
        await _mock_n(client)


async def _mock_n(client: Client) -> None:
    answer = await client.sdk.chat.completions.create(model="mock-chat", messages=HI, n=2)
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.choices[0].message.content == answer.choices[1].message.content  # deterministic
    streamed = await client.post({"model": "mock-chat", "messages": HI, "n": 2, "stream": True})
    indices = {c["choices"][0]["index"] for c in events(streamed.text) if c["choices"]}
    assert indices == {0, 1}
    charges = await settled(client, 4)
    assert len(charges) == 4
