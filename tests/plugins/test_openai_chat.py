"""POST /v1/chat/completions, driven by the official openai SDK, curl and raw HTTP against a live gateway."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest

from core import ChatRequest, ContentDelta, LedgerEntry, ProviderEvent, estimate_tokens, hookimpl
from core.testing.fake_upstream import FakeUpstream, Scenario, ToolCallSpec
from plugins.openai_compat import wire
from providers.mock import MockProvider
from tests.conftest import PRICED_MODELS, RunningGateway, charges_settled, deepseek_config, funded_key
from tests.conftest import settled as settled_ledger


class Client:
    """A gateway with a funded key, and the official SDK pointed at it."""

    def __init__(self, gateway: RunningGateway, key: str, user_id: int) -> None:
        self.gateway = gateway
        self.key = key
        self.user_id = user_id
        self.sdk = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)

    async def post(self, body: Any, **headers: str) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.gateway.client.post(
            "/v1/chat/completions",
            content=content,
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json", **headers},
        )

    async def balance(self) -> int:
        user = await self.gateway.services.accounts.find_user("api@example.com")
        assert user is not None
        return user.balance

    async def ledger(self) -> list[LedgerEntry]:
        return await self.gateway.services.billing.store.list_ledger(self.user_id)


@pytest.fixture
async def client(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., object]
) -> AsyncIterator[Client]:
    config = write_config(deepseek_config(fake_deepseek.url, extra="max_retries = 0") + PRICED_MODELS)
    gateway: RunningGateway = await gateway_factory(config)  # type: ignore[assignment,misc]
    client = Client(gateway, *await funded_key(gateway))
    yield client
    await client.sdk.close()


async def settled(client: Client, count: int) -> list[LedgerEntry]:
    """The charges once ``count`` requests have settled."""
    return await charges_settled(client.gateway, client.user_id, count)


# --- the official SDK ---


async def test_sdk_non_streaming_answer(client: Client, fake_deepseek: FakeUpstream) -> None:
    fake_deepseek.scenario = Scenario(content="Hello from DeepSeek.")
    answer = await client.sdk.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "Hi"}], temperature=0.7
    )
    assert answer.object == "chat.completion"
    assert answer.id.startswith("chatcmpl-")
    assert answer.model == "deepseek-chat"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == "Hello from DeepSeek."
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens > 0
    assert fake_deepseek.requests[-1].body["temperature"] == 0.7


async def test_sdk_non_streaming_reasoning_is_on_the_message(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(reasoning="Count them.", content="Three.")
    answer = await client.sdk.chat.completions.create(
        model="deepseek-reasoner", messages=[{"role": "user", "content": "How many r in strawberry?"}]
    )
    message = answer.choices[0].message
    assert message.content == "Three."
    assert message.reasoning_content == "Count them."  # type: ignore[attr-defined]
    assert answer.usage is not None
    assert answer.usage.completion_tokens_details is not None
    assert answer.usage.completion_tokens_details.reasoning_tokens > 0


async def test_sdk_streaming_with_usage(client: Client, fake_deepseek: FakeUpstream) -> None:
    fake_deepseek.scenario = Scenario(reasoning="Think.", content="Streamed answer.")
    stream = await client.sdk.chat.completions.create(
        model="deepseek-reasoner",
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    reasoning = "".join(
        getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == "Think."
    assert content == "Streamed answer."
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == ["stop"]
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens > 0


async def test_streaming_without_include_usage_has_no_usage_chunk(client: Client) -> None:
    stream = await client.sdk.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_sdk_tool_calls_stream_and_not(client: Client, fake_deepseek: FakeUpstream) -> None:
    arguments = '{"location": "Paris"}'
    fake_deepseek.scenario = Scenario(tool_call=ToolCallSpec(name="weather", arguments=arguments))
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    answer = await client.sdk.chat.completions.create(model="deepseek-chat", messages=messages, tools=tools)
    call = answer.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert (call.function.name, call.function.arguments) == ("weather", arguments)  # type: ignore[union-attr]
    assert answer.choices[0].finish_reason == "tool_calls"
    stream = await client.sdk.chat.completions.create(
        model="deepseek-chat", messages=messages, tools=tools, stream=True
    )
    parts = [tc for c in [c async for c in stream] for tc in (c.choices[0].delta.tool_calls or [])]
    assert parts[0].id
    assert parts[0].function.name == "weather"
    assert "".join(p.function.arguments or "" for p in parts) == arguments  # type: ignore[union-attr]


async def test_sdk_models(client: Client) -> None:
    models = [m.id async for m in client.sdk.models.list()]
    assert "deepseek-chat" in models
    model = await client.sdk.models.retrieve("deepseek-chat")
    assert model.id == "deepseek-chat"
    with pytest.raises(openai.NotFoundError):
        await client.sdk.models.retrieve("nope")


# --- routing ---


async def test_x_ai_provider_picks_the_instance_case_insensitively(client: Client) -> None:
    response = await client.post(
        {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Hi"}]},
        **{"X-AI-Provider": "DeepSeek"},
    )
    assert response.status_code == 200
    response = await client.post(
        {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Hi"}]},
        **{"X-AI-Provider": "nosuch"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert "deepseek" in error["message"]
    assert "mock" in error["message"]


async def test_unknown_model_is_404_model_not_found(client: Client) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.sdk.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.code == "model_not_found"


async def test_x_api_key_header_works(client: Client) -> None:
    response = await client.gateway.client.post(
        "/v1/chat/completions",
        json={"model": "deepseek-chat", "messages": [{"role": "user", "content": "Hi"}]},
        headers={"X-API-Key": client.key},
    )
    assert response.status_code == 200


async def test_a_bad_key_is_401_for_the_sdk(client: Client) -> None:
    async with openai.AsyncOpenAI(
        base_url=client.gateway.url + "/v1", api_key="sk-cg-wrong", max_retries=0
    ) as sdk:
        with pytest.raises(openai.AuthenticationError) as caught:
            await sdk.chat.completions.create(
                model="deepseek-chat", messages=[{"role": "user", "content": "Hi"}]
            )
    assert caught.value.code == "invalid_api_key"


# --- validation ---


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "deepseek-chat"}, "messages"),
        ({"model": "deepseek-chat", "messages": []}, "messages"),
        ({"model": "deepseek-chat", "messages": "hi"}, "messages"),
        ({"model": "deepseek-chat", "messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"model": "deepseek-chat", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"model": "deepseek-chat", "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": "deepseek-chat", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        (
            {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": 2.5},
            "temperature",
        ),
        (
            {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
            "temperature",
        ),
        (
            {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
            "max_tokens",
        ),
        ({"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
        ({"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "top_p"),
        (
            {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
            "stream",
        ),
        ({"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}], "n": 9}, "n"),
    ],
)
async def test_bad_fields_answer_400_naming_the_param_and_charge_nothing(
    client: Client, fake_deepseek: FakeUpstream, body: dict[str, Any], param: str
) -> None:
    response = await client.post(body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert param.split("[")[0] in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fake_deepseek.requests == []
    assert [e.kind for e in await client.ledger()] == ["topup"]


async def test_malformed_json_is_400(client: Client) -> None:
    response = await client.post(b'{"model": "deepseek-chat", "messages": [')
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


async def test_unknown_fields_are_passed_upstream(client: Client, fake_deepseek: FakeUpstream) -> None:
    answer = await client.sdk.chat.completions.create(
        model="deepseek-chat",
        messages=[{"role": "user", "content": "Hi"}],
        extra_body={"reasoning_effort": "high", "logit_bias": {"42": 1}},
    )
    assert answer.choices[0].message.content
    body = fake_deepseek.requests[-1].body
    assert body["reasoning_effort"] == "high"
    assert body["logit_bias"] == {"42": 1}


# --- failures ---


async def test_upstream_failure_before_the_reply_keeps_its_status(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(status=503)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.sdk.chat.completions.create(
            model="deepseek-chat", messages=[{"role": "user", "content": "Hi"}]
        )
    assert caught.value.status_code == 503
    assert "Server Overloaded" in str(caught.value)
    with pytest.raises(openai.InternalServerError):
        await client.sdk.chat.completions.create(
            model="deepseek-chat", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
    charges = await settled(client, 2)
    assert all(e.amount == 0 and e.outcome == "error" for e in charges)


async def test_a_failure_mid_stream_is_an_error_event_the_sdk_raises(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(tokens=40, disconnect_after=5)
    stream = await client.sdk.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    seen: list[Any] = []

    async def read() -> None:
        async for chunk in stream:
            seen.append(chunk)

    with pytest.raises(openai.APIError) as caught:
        await read()
    assert seen, "the reply had begun"
    assert "middle of the reply" in caught.value.message
    (charge,) = await settled(client, 1)
    assert charge.outcome == "error"
    assert charge.completion_tokens > 0  # what was streamed is charged


async def test_a_store_failure_answers_500_in_openai_shape_and_the_server_goes_on(
    client: Client, fake_deepseek: FakeUpstream, tmp_path: Path
) -> None:
    """The route skips the router's exception handlers (see core.app.Gateway): it answers for itself."""
    hi = [{"role": "user", "content": "Hi"}]
    db = sqlite3.connect(tmp_path / "chatgate.db")
    db.execute("ALTER TABLE ledger RENAME TO ledger_away")  # every reservation now fails
    db.commit()
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.sdk.with_options(max_retries=0).chat.completions.create(
                model="deepseek-chat",
                messages=hi,  # type: ignore[arg-type]
            )
    finally:
        db.execute("ALTER TABLE ledger_away RENAME TO ledger")
        db.commit()
        db.close()
    assert caught.value.status_code == 500
    assert caught.value.type == "server_error"
    assert "failed before the request went upstream" in caught.value.message
    assert fake_deepseek.requests == []
    answer = await client.sdk.chat.completions.create(model="deepseek-chat", messages=hi)  # type: ignore[arg-type]
    assert answer.choices[0].message.content


# --- money ---


async def test_each_request_leaves_one_ledger_entry_at_the_model_prices(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    before = await client.balance()
    answer = await client.sdk.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "Hi"}]
    )
    (charge,) = await settled(client, 1)
    assert answer.usage is not None
    assert charge.prompt_tokens == answer.usage.prompt_tokens
    assert charge.completion_tokens == answer.usage.completion_tokens
    expected = answer.usage.prompt_tokens * 1000 + answer.usage.completion_tokens * 2000
    assert charge.amount == -expected
    assert charge.model == "deepseek-chat"
    assert charge.provider == "deepseek"
    assert charge.outcome == "complete"
    assert charge.latency_ms is not None
    assert charge.key_id is not None
    assert await client.balance() == before - expected


async def test_an_exhausted_balance_is_403_insufficient_user_quota(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    await client.gateway.services.billing.top_up(client.user_id, -(await client.balance()))
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await client.sdk.chat.completions.create(
            model="deepseek-chat", messages=[{"role": "user", "content": "Hi"}]
        )
    assert caught.value.code == "insufficient_user_quota"
    assert fake_deepseek.requests == []


async def test_a_client_that_disconnects_mid_stream_cancels_upstream_and_pays_for_what_it_got(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(tokens=200, token_delay=0.05)
    body = {
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {client.key}"}
    async with (
        httpx.AsyncClient(base_url=client.gateway.url) as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response,
    ):
        received = 0
        async for line in response.aiter_lines():
            if '"content":"' in line and '"content":""' not in line:
                received += 1
            if received >= 3:
                break
        stopped = time.monotonic()
    noticed = await fake_deepseek.wait_for_disconnect(timeout=2)
    assert noticed - stopped < 0.5
    (charge,) = await settled(client, 1)
    assert charge.outcome == "cancelled"
    assert 0 < charge.completion_tokens < 200
    assert charge.amount < 0


async def test_a_client_that_gives_up_on_a_whole_reply_cancels_upstream(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(tokens=200, first_token_delay=10)  # a whole answer ~10 s away
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Take your time"}]}
    headers = {"Authorization": f"Bearer {client.key}"}
    async with httpx.AsyncClient(base_url=client.gateway.url, timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/chat/completions", json=body, headers=headers)
        stopped = time.monotonic()
    noticed = await fake_deepseek.wait_for_disconnect(timeout=2)
    assert noticed - stopped < 0.5
    (charge,) = await settled(client, 1)
    assert charge.outcome == "cancelled"
    assert charge.amount == 0  # nothing came back, so nothing is charged


async def test_another_method_is_405_in_openai_shape(client: Client) -> None:
    response = await client.gateway.client.get(
        "/v1/chat/completions", headers={"Authorization": f"Bearer {client.key}"}
    )
    assert response.status_code == 405
    assert response.headers["allow"] == "OPTIONS, POST"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "GET" in error["message"]
    options = await client.gateway.client.options("/v1/chat/completions")
    assert options.status_code == 204
    assert options.headers["allow"] == "OPTIONS, POST"


# --- clients no one here wrote ---


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_the_seed_curl_example_streams(client: Client) -> None:
    command = [
        "curl", "-sN", "-X", "POST", f"{client.gateway.url}/v1/chat/completions",
        "-H", "Content-Type: application/json",
        "-H", f"X-API-Key: {client.key}",
        "-H", "X-AI-Provider: deepseek",
        "-d", json.dumps({
            "model": "deepseek-chat",
            "messages": [{"role": "user", "content": "你好,请介绍一下青城数智平台"}],
            "temperature": 0.7, "max_tokens": 1000, "stream": True,
        }),
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE)
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    lines = [line for line in out.decode().split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in lines[:-1]
        if line.startswith("data: {")
    )
    assert text


SEEDS = Path(__file__).parent / "seeds"


async def run_seed(client: Client, tmp_path: Path, name: str, *command: str) -> str:
    """Run one of seed 001's examples, unchanged but for the server's URL and the key."""
    source = (SEEDS / name).read_text().replace("http://localhost:9090", client.gateway.url)
    path = tmp_path / name
    path.write_text(source.replace("your-api-key-here", client.key))
    process = await asyncio.create_subprocess_exec(
        *command, str(path), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_the_seed_python_example(client: Client, fake_deepseek: FakeUpstream, tmp_path: Path) -> None:
    fake_deepseek.scenario = Scenario(content="你好!我是青城数智的助手。")
    out = await run_seed(client, tmp_path, "001_requests.py", sys.executable)
    assert "'object': 'chat.completion'" in out
    assert "你好!我是青城数智的助手。" in out
    assert fake_deepseek.requests[-1].body["temperature"] == 0.7


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_the_seed_javascript_example(
    client: Client, fake_deepseek: FakeUpstream, tmp_path: Path
) -> None:
    fake_deepseek.scenario = Scenario(content="你好!我是青城数智的助手。")
    out = await run_seed(client, tmp_path, "001_fetch.mjs", "node")
    # node prints two levels of the object (the message itself shows as [Object]).
    assert "object: 'chat.completion'" in out
    assert "model: 'deepseek-chat'" in out
    assert "total_tokens:" in out


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_the_seed_javascript_streaming_example(
    client: Client, fake_deepseek: FakeUpstream, tmp_path: Path
) -> None:
    fake_deepseek.scenario = Scenario(content="Streaming works from the seed's own client.")
    out = await run_seed(client, tmp_path, "001_stream.mjs", "node")
    assert "".join(out.splitlines()) == "Streaming works from the seed's own client."


async def test_fifty_concurrent_requests_never_overdraw_and_the_ledger_adds_up(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.scenario = Scenario(tokens=24, token_delay=0.005)
    request = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50}
    route = client.gateway.services.catalog.route("deepseek-chat")
    parsed = wire.parse(json.dumps(request).encode())
    worst = client.gateway.services.billing.worst_case(route, parsed.request)
    await client.gateway.services.billing.top_up(client.user_id, -(await client.balance()))
    await client.gateway.services.billing.top_up(client.user_id, worst * 10 + worst // 2)
    responses = await asyncio.gather(*(client.post(request) for _ in range(50)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 403}, statuses
    ok = statuses.count(200)
    assert ok >= 10, statuses
    assert all(
        r.json()["error"]["code"] == "insufficient_user_quota" for r in responses if r.status_code == 403
    )
    charges = await settled(client, ok)
    assert len(charges) == ok  # one entry per served request, none for refused ones
    entries = await client.ledger()
    balance = await client.balance()
    assert balance >= 0
    assert all(e.balance_after >= 0 for e in entries)
    assert sum(e.amount for e in entries) == balance
    usage = sum(r.json()["usage"]["prompt_tokens"] * 1000 + r.json()["usage"]["completion_tokens"] * 2000
                for r in responses if r.status_code == 200)  # fmt: skip
    assert -sum(c.amount for c in charges) == usage


async def test_a_slow_first_token_gets_keep_alive_comments(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., object]
) -> None:
    config = write_config(
        deepseek_config(fake_deepseek.url) + PRICED_MODELS,
        replace={"[surfaces.openai_compat]\n": "[surfaces.openai_compat]\nkeepalive_interval = 0.1\n"},
    )
    gateway: RunningGateway = await gateway_factory(config)  # type: ignore[assignment,misc]
    key, secret = await gateway.services.accounts.create_key("slow@example.com")
    await gateway.services.billing.top_up(key.user_id, 100_000_000)
    fake_deepseek.scenario = Scenario(first_token_delay=0.5, content="Finally.")
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    response = await gateway.client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"}
    )
    assert response.status_code == 200
    events = response.text.split("\n\n")
    assert events.count(": keep-alive") >= 2
    assert events[-2] == "data: [DONE]"
    async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=secret, max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(
            model="deepseek-chat", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == "Finally."


async def test_a_body_over_the_limit_is_413_in_openai_shape(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., object]
) -> None:
    config = write_config(
        deepseek_config(fake_deepseek.url) + PRICED_MODELS,
        replace={'host = "127.0.0.1"\n': 'host = "127.0.0.1"\nmax_body_bytes = 2000\n'},
    )
    gateway: RunningGateway = await gateway_factory(config)  # type: ignore[assignment,misc]
    _, secret = await gateway.services.accounts.create_key("big@example.com")
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "x" * 5000}]}
    response = await gateway.client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"}
    )
    assert response.status_code == 413
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "2000" in error["message"]
    assert fake_deepseek.requests == []


class Broken(MockProvider):
    """A provider that breaks its contract: a bare exception after its first word."""

    name = "broken"

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        yield ContentDelta("Half")
        raise RuntimeError("secret-ish detail from inside the provider")


@pytest.mark.parametrize("stream", [False, True])
async def test_a_provider_breaking_its_contract_is_a_503_that_shows_no_internals(
    write_config: Callable[..., Path], gateway_factory: Callable[..., Any], stream: bool
) -> None:
    """The same answer as a stored reply gets: Unavailable, the exception's type only; and the
    reply is settled for what it produced."""
    plugin = SimpleNamespace(__name__="broken_provider", register_providers=hookimpl(lambda: [Broken]))
    config = write_config('[providers.broken]\nplugin = "broken"\nmodels = ["mock-chat"]\n')
    config.write_text(
        config.read_text().replace(
            '[models.mock-chat]\nprovider = "mock"', '[models.mock-chat]\nprovider = "broken"'
        )
    )
    gateway: RunningGateway = await gateway_factory(config, extra_plugins=[plugin])
    key, secret = await gateway.services.accounts.create_key("broken@example.com")
    await gateway.services.billing.top_up(key.user_id, 10_000_000)
    body = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    answer = await gateway.client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"}
    )
    if stream:  # the stream began: the failure is its last event
        assert answer.status_code == 200
        events = [
            line.removeprefix("data: ") for line in answer.text.splitlines() if line.startswith("data: {")
        ]
        error = json.loads(events[-1])["error"]
    else:
        assert answer.status_code == 503
        error = answer.json()["error"]
    assert error["message"] == "internal error in provider: RuntimeError"
    assert "secret-ish" not in answer.text
    charges = [e for e in await settled_ledger(gateway, key.user_id) if e.kind == "charge"]
    assert [c.outcome for c in charges] == ["error"]
    assert charges[0].completion_tokens == estimate_tokens("Half")  # what it produced is charged


# --- paths ---


async def test_deepseeks_base_url_without_v1_works_as_with_it(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    """DeepSeek documents https://api.deepseek.com as a base URL: clients then call /chat/completions."""
    fake_deepseek.scenario = Scenario(content="Hello without v1.")
    sdk = openai.AsyncOpenAI(base_url=client.gateway.url, api_key=client.key, max_retries=0)
    try:
        answer = await sdk.chat.completions.create(
            model="deepseek-chat", messages=[{"role": "user", "content": "Hi"}]
        )
        assert answer.choices[0].message.content == "Hello without v1."
        chunks = [
            chunk.choices[0].delta.content or ""
            async for chunk in await sdk.chat.completions.create(
                model="deepseek-chat", messages=[{"role": "user", "content": "Hi"}], stream=True
            )
            if chunk.choices
        ]
        assert "".join(chunks) == "Hello without v1."
        assert [m.id for m in (await sdk.models.list()).data] == [
            m.id for m in (await client.sdk.models.list()).data
        ]
        assert (await sdk.models.retrieve("deepseek-chat")).id == "deepseek-chat"
    finally:
        await sdk.close()


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/v1/embeddingz"), ("GET", "/v1"), ("DELETE", "/v1/files/x")]
)
async def test_an_unknown_path_under_v1_is_404_in_openais_shape(
    client: Client, method: str, path: str
) -> None:
    response = await client.gateway.client.request(
        method, path, headers={"Authorization": f"Bearer {client.key}"}
    )
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": f"Invalid URL ({method} {path})",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    # The SDK shows that message instead of a bare 404.
    with pytest.raises(openai.NotFoundError, match=r"Invalid URL \(POST /v1/embeddingz\)"):
        await client.sdk.post("/embeddingz", cast_to=object, body={})


# --- content parts ---


async def test_an_unknown_content_part_type_is_a_400_naming_it(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    parts = [{"type": "text", "text": "Hi"}, {"type": "video_url", "video_url": {"url": "https://x"}}]
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": parts}]}
    response = await client.post(body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_value",
        "messages[0].content[1].type",
    )
    assert "'video_url'" in error["message"]
    with pytest.raises(openai.BadRequestError, match="video_url"):
        await client.sdk.chat.completions.create(**body)  # type: ignore[call-overload]
    assert fake_deepseek.requests == []


async def test_an_image_for_a_model_without_vision_is_a_400_not_dropped(
    client: Client, fake_deepseek: FakeUpstream
) -> None:
    parts = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:,x"}},
    ]
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": parts}]}
    response = await client.post(body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("image_not_supported", "messages[0].content[1]")
    assert "vision" in error["message"]
    assert fake_deepseek.requests == []
    assert [entry.kind for entry in await client.ledger()] == ["topup"]  # nothing reserved


async def test_a_model_with_vision_takes_images(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., object]
) -> None:
    models = PRICED_MODELS.replace(
        "max_output_tokens = 4096\n", "max_output_tokens = 4096\nvision = true\n", 1
    )
    config = write_config(deepseek_config(fake_deepseek.url, extra="max_retries = 0") + models)
    gateway: RunningGateway = await gateway_factory(config)  # type: ignore[assignment,misc]
    key, secret = await gateway.services.accounts.create_key("eyes@example.com")
    await gateway.services.billing.top_up(key.user_id, 100_000_000)
    parts = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:,x"}},
    ]
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": parts}]}
    response = await gateway.client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"}
    )
    assert response.status_code == 200, response.text
    assert fake_deepseek.requests[-1].body["messages"][0]["content"] == parts  # sent as it came
