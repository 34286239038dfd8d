"""POST /v1/embeddings: the mock's deterministic vectors, an OpenAI-compatible upstream's passed
through, floats or base64, charged at the model's input price, refused clearly when wrong;
driven by the official openai SDK, LangChain, curl and raw HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import shutil
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from core import EmbeddingRequest, Embeddings, RateLimits, Usage
from core.app import create_app
from core.config import load_config
from core.errors import ConfigError
from core.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import FAKE_DEEPSEEK_KEY, PRICED_MODELS, RunningGateway, deepseek_config
from tests.conftest import settled as settled_ledger

EMBEDDINGS = f"""
[providers.vectors]
plugin = "openai_compatible"
base_url = "{{url}}/v1"
api_key = "{FAKE_DEEPSEEK_KEY}"
max_retries = 0

[providers.vectors.aliases]
upstream-embedding = {{{{ model = "text-embedding-fake" }}}}

[models.mock-embedding]
provider = "mock"
kind = "embedding"
input_price = 1000
context_tokens = 8192

[models.upstream-embedding]
provider = "vectors"
kind = "embedding"
input_price = 2000
context_tokens = 8192

[models.deepseek-embedding]
provider = "deepseek"
kind = "embedding"
input_price = 1000
"""


class Caller:
    """A funded key on a gateway, with the official SDK and raw HTTP."""

    def __init__(self, gateway: RunningGateway, key: str, user_id: int) -> None:
        self.gateway = gateway
        self.key = key
        self.user_id = user_id
        self.sdk = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)

    async def post(self, body: Any) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        return await self.gateway.client.post("/v1/embeddings", content=content, headers=headers)

    async def ledger(self) -> list[Any]:
        """Every entry but the top-up (a key admitted under a lease has its lease among them)."""
        return [e for e in await settled_ledger(self.gateway, self.user_id) if e.kind != "topup"]

    async def charges(self, count: int) -> list[Any]:
        """The charges once ``count`` requests have settled (a lease's are posted shortly after)."""
        async with asyncio.timeout(5):
            while True:
                charges = [e for e in await self.ledger() if e.kind == "charge"]
                if len(charges) >= count:
                    return charges
                await asyncio.sleep(0.01)

    async def balance(self) -> int:
        return (await self.gateway.services.accounts.get_user(self.user_id)).balance


@pytest.fixture
async def caller(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], gateway_factory: Callable[..., object]
) -> AsyncIterator[Caller]:
    extra = EMBEDDINGS.format(url=fake_deepseek.url)
    config = write_config(deepseek_config(fake_deepseek.url, extra="max_retries = 0") + PRICED_MODELS + extra)
    gateway: RunningGateway = await gateway_factory(config)  # type: ignore[assignment,misc]
    key, secret = await gateway.services.accounts.create_key("vectors@example.com")
    await gateway.services.billing.top_up(key.user_id, 100_000_000)
    caller = Caller(gateway, secret, key.user_id)
    async with caller.sdk:
        yield caller


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(v * v for v in vector))


# --- the mock, offline ---


async def test_sdk_default_base64_gives_deterministic_unit_vectors(caller: Caller) -> None:
    answer = await caller.sdk.embeddings.create(model="mock-embedding", input=["first text", "second text"])
    assert answer.model == "mock-embedding"
    assert [d.index for d in answer.data] == [0, 1]
    first, second = (d.embedding for d in answer.data)
    assert len(first) == len(second) == 256
    assert abs(norm(first) - 1) < 1e-5
    assert first != second
    again = await caller.sdk.embeddings.create(model="mock-embedding", input="first text")
    assert again.data[0].embedding == first
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > 0


async def test_float_and_base64_carry_the_same_vector(caller: Caller) -> None:
    floats = await caller.sdk.embeddings.create(model="mock-embedding", input="same", encoding_format="float")
    raw = await caller.post({"model": "mock-embedding", "input": "same", "encoding_format": "base64"})
    text = raw.json()["data"][0]["embedding"]
    assert isinstance(text, str)
    data = base64.b64decode(text)
    decoded = struct.unpack(f"<{len(data) // 4}f", data)
    assert len(decoded) == len(floats.data[0].embedding) == 256
    assert all(abs(a - b) < 1e-6 for a, b in zip(decoded, floats.data[0].embedding, strict=True))


async def test_dimensions_are_honoured(caller: Caller) -> None:
    answer = await caller.sdk.embeddings.create(model="mock-embedding", input="short", dimensions=32)
    vector = answer.data[0].embedding
    assert len(vector) == 32
    assert abs(norm(vector) - 1) < 1e-5
    too_many = await caller.post({"model": "mock-embedding", "input": "x", "dimensions": 4096})
    assert too_many.status_code == 400
    assert "dimensions" in too_many.json()["error"]["message"]


async def test_token_inputs(caller: Caller) -> None:
    one = (
        await caller.post({"model": "mock-embedding", "input": [1, 2, 3], "encoding_format": "float"})
    ).json()
    assert len(one["data"]) == 1
    assert one["usage"]["prompt_tokens"] == 3
    many = (await caller.post({"model": "mock-embedding", "input": [[1, 2], [3]]})).json()
    assert [d["index"] for d in many["data"]] == [0, 1]
    assert many["usage"]["prompt_tokens"] == 3


async def test_each_call_is_charged_once_at_the_input_price(caller: Caller) -> None:
    before = await caller.balance()
    answer = await caller.sdk.embeddings.create(model="mock-embedding", input=["a b c", "d e f g"])
    (charge,) = await caller.charges(1)
    assert charge.outcome == "complete"
    assert charge.prompt_tokens == answer.usage.prompt_tokens
    assert charge.completion_tokens == 0
    assert charge.amount == -1000 * answer.usage.prompt_tokens  # 1000 credits per million tokens
    assert await caller.balance() == before + charge.amount


# --- an OpenAI-compatible upstream ---


async def test_upstream_embeddings_pass_through_and_are_charged_its_usage(
    caller: Caller, fake_deepseek: FakeUpstream
) -> None:
    answer = await caller.sdk.embeddings.create(
        model="upstream-embedding", input=["hello", "world"], dimensions=16, user="u-1"
    )
    (sent,) = fake_deepseek.embedding_requests
    assert sent.path == "/v1/embeddings"
    assert sent.body == {
        "model": "text-embedding-fake",
        "input": ["hello", "world"],
        "encoding_format": "float",
        "dimensions": 16,
        "user": "u-1",
    }
    assert [len(d.embedding) for d in answer.data] == [16, 16]
    assert abs(norm(answer.data[0].embedding) - 1) < 1e-5
    (charge,) = await caller.charges(1)
    assert charge.prompt_tokens == answer.usage.prompt_tokens == 4  # the fake counts 4 characters a token
    assert charge.amount == -2000 * 4


async def test_an_upstream_failure_is_its_status_and_charges_nothing(
    caller: Caller, fake_deepseek: FakeUpstream
) -> None:
    fake_deepseek.script(Scenario(status=503))
    before = await caller.balance()
    with pytest.raises(openai.InternalServerError):
        await caller.sdk.embeddings.create(model="upstream-embedding", input="hello")
    (entry,) = await caller.charges(1)
    assert entry.amount == 0
    assert entry.outcome == "error"
    assert await caller.balance() == before


async def test_deepseek_has_no_embeddings(caller: Caller, fake_deepseek: FakeUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await caller.sdk.embeddings.create(model="deepseek-embedding", input="hello")
    assert caught.value.code == "embeddings_not_supported"
    assert "no embeddings" in str(caught.value)
    assert fake_deepseek.embedding_requests == []
    assert [e.amount for e in await caller.charges(1)] == [0]


# --- kinds of model ---


async def test_a_chat_model_does_not_embed_and_an_embedding_model_does_not_chat(
    caller: Caller, fake_deepseek: FakeUpstream
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await caller.sdk.embeddings.create(model="deepseek-chat", input="hello")
    assert caught.value.param == "model"  # type: ignore[attr-defined]
    assert "not an embedding model" in str(caught.value)
    with pytest.raises(openai.BadRequestError) as chat:
        await caller.sdk.chat.completions.create(
            model="mock-embedding", messages=[{"role": "user", "content": "hi"}]
        )
    assert chat.value.param == "model"  # type: ignore[attr-defined]
    assert "embedding model" in str(chat.value)
    assert fake_deepseek.requests == []
    assert await caller.ledger() == []


async def test_unknown_model_is_404(caller: Caller) -> None:
    with pytest.raises(openai.NotFoundError):
        await caller.sdk.embeddings.create(model="no-such-model", input="hello")


# --- bad requests, refused before anything is charged ---


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "mock-embedding"}, "input"),
        ({"model": "mock-embedding", "input": ""}, "input"),
        ({"model": "mock-embedding", "input": []}, "input"),
        ({"model": "mock-embedding", "input": [""]}, "input[0]"),
        ({"model": "mock-embedding", "input": ["a", 1]}, "input[1]"),
        ({"model": "mock-embedding", "input": [[]]}, "input[0]"),
        ({"model": "mock-embedding", "input": [[1, -2]]}, "input[0]"),
        ({"model": "mock-embedding", "input": ["a", [1]]}, "input"),
        ({"model": "mock-embedding", "input": {"text": "a"}}, "input"),
        ({"model": "mock-embedding", "input": ["x"] * 2049}, "input"),
        ({"model": "mock-embedding", "input": "a", "encoding_format": "hex"}, "encoding_format"),
        ({"model": "mock-embedding", "input": "a", "dimensions": 0}, "dimensions"),
        ({"model": "mock-embedding", "input": "a", "dimensions": "8"}, "dimensions"),
        ({"model": "mock-embedding", "input": "a", "user": 7}, "user"),
        ({"input": "a"}, "model"),
        ({"model": "mock-embedding", "input": "word " * 40_000}, "input"),
    ],
)
async def test_bad_fields_answer_400_naming_them(caller: Caller, body: dict[str, Any], param: str) -> None:
    response = await caller.post(body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert param.split("[")[0] in error["message"]
    assert await caller.ledger() == []


async def test_malformed_json_and_missing_key(caller: Caller) -> None:
    response = await caller.post(b'{"model": ')
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    anonymous = await caller.gateway.client.post(
        "/v1/embeddings", json={"model": "mock-embedding", "input": "a"}
    )
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "missing_api_key"


# --- balance and limits ---


async def test_insufficient_balance_is_403_and_nothing_goes_upstream(
    caller: Caller, fake_deepseek: FakeUpstream
) -> None:
    key, secret = await caller.gateway.services.accounts.create_key("broke@example.com")
    poor = Caller(caller.gateway, secret, key.user_id)
    async with poor.sdk:
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await poor.sdk.embeddings.create(model="upstream-embedding", input="hello")
    assert caught.value.code == "insufficient_user_quota"
    assert fake_deepseek.embedding_requests == []


async def test_key_limits_hold(caller: Caller) -> None:
    key = await caller.gateway.services.accounts.authenticate_headers(
        {"authorization": f"Bearer {caller.key}"}
    )
    assert key.key is not None
    await caller.gateway.services.accounts.set_limits(key.key.id, RateLimits(requests_per_minute=1))
    first = await caller.post({"model": "mock-embedding", "input": "one"})
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "1"
    second = await caller.post({"model": "mock-embedding", "input": "two"})
    assert second.status_code == 429
    assert second.headers["retry-after"]
    assert len(await caller.charges(1)) == 1


# --- other clients ---


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl(caller: Caller) -> None:
    command = [
        "curl", "-s", f"{caller.gateway.url}/v1/embeddings",
        "-H", f"Authorization: Bearer {caller.key}", "-H", "Content-Type: application/json",
        "-d", json.dumps({"model": "mock-embedding", "input": "curl me", "encoding_format": "float"}),
    ]  # fmt: skip
    result = await asyncio_run(command)
    body = json.loads(result)
    assert body["object"] == "list"
    assert body["data"][0]["object"] == "embedding"
    assert len(body["data"][0]["embedding"]) == 256


async def asyncio_run(command: list[str]) -> str:
    process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE)
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    return out.decode()


async def test_langchain_openai_embeddings(caller: Caller) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    # check_embedding_ctx_length=False: otherwise LangChain tokenizes with tiktoken first, which
    # downloads its encoding (no network here) and sends token arrays.
    async with httpx.AsyncClient() as http:  # LangChain leaves the client it makes itself open
        embeddings = langchain_openai.OpenAIEmbeddings(
            model="mock-embedding",
            base_url=caller.gateway.url + "/v1",
            api_key=caller.key,
            check_embedding_ctx_length=False,
            max_retries=0,
            http_async_client=http,
        )
        vectors = await embeddings.aembed_documents(["one", "two"])
        query = await embeddings.aembed_query("one")
    assert len(vectors) == 2
    assert len(vectors[0]) == 256
    assert all(abs(a - b) < 1e-6 for a, b in zip(vectors[0], query, strict=True))


# --- the reservation, the provider's answer, the client leaving (a provider replaced in-process) ---


def replace_embed(caller: Caller, embed: Callable[[EmbeddingRequest], Awaitable[Embeddings]]) -> None:
    route = caller.gateway.services.catalog.route("mock-embedding", None)
    route.provider.embed = embed  # type: ignore[method-assign]


async def test_the_reservation_is_an_upper_bound_and_caps_an_over_reporting_upstream(caller: Caller) -> None:
    async def embed(request: EmbeddingRequest) -> Embeddings:
        return Embeddings(tuple((1.0, 0.0) for _ in request.inputs), Usage(prompt_tokens=1_000_000))

    replace_embed(caller, embed)
    before = await caller.balance()
    response = await caller.post(
        {"model": "mock-embedding", "input": "héllo world", "encoding_format": "float"}
    )
    assert response.status_code == 200
    (charge,) = await caller.charges(1)
    # Reserved: the text's 12 UTF-8 bytes (no more tokens than bytes); charged no more than that.
    assert charge.amount == -12 * 1000
    assert await caller.balance() == before - 12 * 1000


async def test_an_upstream_counting_nothing_shows_the_client_what_it_paid_for(caller: Caller) -> None:
    async def embed(request: EmbeddingRequest) -> Embeddings:
        return Embeddings(tuple((1.0, 0.0) for _ in request.inputs), Usage())

    replace_embed(caller, embed)
    response = await caller.post(
        {"model": "mock-embedding", "input": "some words here", "encoding_format": "float"}
    )
    (charge,) = await caller.charges(1)
    assert charge.prompt_tokens > 0
    assert response.json()["usage"]["prompt_tokens"] == charge.prompt_tokens
    assert charge.amount == -1000 * charge.prompt_tokens


@pytest.mark.parametrize("value", [1e300, math.inf, math.nan])
async def test_a_vector_no_client_can_read_is_a_502_charged_nothing(caller: Caller, value: float) -> None:
    async def embed(request: EmbeddingRequest) -> Embeddings:
        return Embeddings(tuple((value, 0.0) for _ in request.inputs), Usage(prompt_tokens=3))

    replace_embed(caller, embed)
    before = await caller.balance()
    response = await caller.post({"model": "mock-embedding", "input": "hello", "encoding_format": "base64"})
    assert response.status_code == 502
    assert "finite float32" in response.json()["error"]["message"]
    (entry,) = await caller.charges(1)
    assert (entry.amount, entry.outcome) == (0, "error")
    assert await caller.balance() == before


async def test_an_unexpected_failure_answers_openais_error_body(caller: Caller) -> None:
    services = caller.gateway.services
    original = services.catalog.route

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    services.catalog.route = broken  # type: ignore[method-assign]
    try:
        response = await caller.post({"model": "mock-embedding", "input": "hello"})
    finally:
        services.catalog.route = original  # type: ignore[method-assign]
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"


class Held:
    """A provider call that waits until the test lets it answer."""

    def __init__(self, caller: Caller) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0
        replace_embed(caller, self.embed)

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        return Embeddings(tuple((1.0, 0.0) for _ in request.inputs), Usage(prompt_tokens=2))


async def test_a_client_leaving_mid_call_still_settles_it_once(caller: Caller) -> None:
    held = Held(caller)
    call = asyncio.ensure_future(caller.post({"model": "mock-embedding", "input": "hello"}))
    async with asyncio.timeout(5):
        await held.started.wait()
    call.cancel()  # the client hangs up
    with pytest.raises(asyncio.CancelledError):
        await call
    held.release.set()
    (charge,) = await caller.charges(1)
    assert (charge.outcome, charge.amount, charge.prompt_tokens) == ("complete", -2000, 2)


async def test_concurrent_requests_and_tokens_per_minute_hold_for_embeddings(caller: Caller) -> None:
    key = await caller.gateway.services.accounts.authenticate_headers(
        {"authorization": f"Bearer {caller.key}"}
    )
    assert key.key is not None
    services = caller.gateway.services
    await services.accounts.set_limits(key.key.id, RateLimits(concurrent_requests=1))
    held = Held(caller)
    first = asyncio.ensure_future(caller.post({"model": "mock-embedding", "input": "one"}))
    async with asyncio.timeout(5):
        await held.started.wait()
    second = await caller.post({"model": "mock-embedding", "input": "two"})
    assert second.status_code == 429
    assert "concurrent" in second.json()["error"]["message"]
    held.release.set()
    assert (await first).status_code == 200
    assert held.calls == 1
    # 15 bytes reserve 15 tokens (settled at the 2 the provider counts); then 19 more pass 20.
    await services.accounts.set_limits(key.key.id, RateLimits(tokens_per_minute=20))
    assert (await caller.post({"model": "mock-embedding", "input": "x" * 15})).status_code == 200
    refused = await caller.post({"model": "mock-embedding", "input": "y" * 19})
    assert refused.status_code == 429
    assert held.calls == 2


@pytest.mark.parametrize(
    ("surface", "key"),
    [
        ('[surfaces.email_socket]\nmodel = "mock-embedding"\n', "surfaces.email_socket.model"),
        (
            '[surfaces.topic_chat]\n[[surfaces.topic_chat.series]]\nid = 1\nname = "Vectors"\n'
            '[[surfaces.topic_chat.series.models]]\nid = 1\nmodel = "mock-embedding"\n',
            "surfaces.topic_chat.series.0.models.0.model",
        ),
    ],
)
async def test_a_surface_that_would_chat_with_an_embedding_model_is_a_configuration_error(
    fake_deepseek: FakeUpstream, write_config: Callable[..., Path], surface: str, key: str
) -> None:
    head = surface.split("\n", 1)[0] + "\n"
    config = write_config(
        deepseek_config(fake_deepseek.url) + PRICED_MODELS + EMBEDDINGS.format(url=fake_deepseek.url),
        replace={head: surface},
    )
    with pytest.raises(ConfigError) as caught:
        create_app(load_config(config))
    (problem,) = caught.value.problems
    assert problem.key == key
    assert "embedding model" in problem.found
