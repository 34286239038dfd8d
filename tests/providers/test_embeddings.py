"""The embeddings capability of providers: the default refusal, the mock's vectors, fallbacks,
and decoding an upstream's vectors (floats or base64)."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import AsyncGenerator

import pytest

from core import (
    ChatRequest,
    EmbeddingRequest,
    EmbeddingsUnsupported,
    Provider,
    ProviderEvent,
    Unavailable,
)
from core.fallbacks import Fallbacks
from providers.mock import MockOptions, MockProvider
from providers.openai_wire import vector_of


class ChatOnly(Provider):
    name = "chat_only"

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        raise NotImplementedError
        yield  # pragma: no cover


async def test_a_provider_without_embeddings_refuses_with_a_400() -> None:
    provider = ChatOnly("plain", None)
    with pytest.raises(EmbeddingsUnsupported) as caught:
        await provider.embed(EmbeddingRequest("m", ("text",)))
    assert caught.value.status == 400
    assert "'plain'" in caught.value.message


async def test_mock_vectors_are_deterministic_unit_vectors_and_dimensions_truncate() -> None:
    mock = MockProvider("mock", MockOptions(first_token_delay=0))
    full = await mock.embed(EmbeddingRequest("mock-embedding", ("same text", (1, 2, 3))))
    again = await mock.embed(EmbeddingRequest("mock-embedding", ("same text",)))
    assert full.vectors[0] == again.vectors[0]
    assert all(len(v) == 256 and abs(math.hypot(*v) - 1) < 1e-9 for v in full.vectors)
    assert full.usage.prompt_tokens > 3  # the text's estimate plus three tokens
    short = await mock.embed(EmbeddingRequest("mock-embedding", ("same text",), dimensions=8))
    head = full.vectors[0][:8]
    scale = math.hypot(*head)
    assert all(abs(a - b / scale) < 1e-9 for a, b in zip(short.vectors[0], head, strict=True))


async def test_mock_refuses_a_chat_model_and_fails_as_configured() -> None:
    mock = MockProvider("mock", MockOptions(first_token_delay=0))
    with pytest.raises(Exception, match="not an embedding model"):
        await mock.embed(EmbeddingRequest("mock-chat", ("x",)))
    failing = MockProvider("down", MockOptions(first_token_delay=0, fail="unavailable"))
    with pytest.raises(Unavailable):
        await failing.embed(EmbeddingRequest("mock-embedding", ("x",)))


async def test_fallbacks_embed_with_the_next_instance_after_a_retryable_failure() -> None:
    down = MockProvider("down", MockOptions(first_token_delay=0, fail="unavailable"))
    up = MockProvider("up", MockOptions(first_token_delay=0))
    result = await Fallbacks([down, up]).embed(EmbeddingRequest("mock-embedding", ("x",)))
    assert len(result.vectors) == 1
    refused = MockProvider("refused", MockOptions(first_token_delay=0, fail="bad_request"))
    with pytest.raises(Exception, match="rejected"):
        await Fallbacks([refused, up]).embed(EmbeddingRequest("mock-embedding", ("x",)))


async def test_fallbacks_skip_a_member_without_embeddings() -> None:
    plain = ChatOnly("plain", None)
    up = MockProvider("up", MockOptions(first_token_delay=0))
    result = await Fallbacks([plain, up]).embed(EmbeddingRequest("mock-embedding", ("x",)))
    assert len(result.vectors) == 1
    # After a retryable failure, a member without embeddings last: the failure is what is raised.
    down = MockProvider("down", MockOptions(first_token_delay=0, fail="unavailable"))
    with pytest.raises(Unavailable):
        await Fallbacks([down, plain]).embed(EmbeddingRequest("mock-embedding", ("x",)))
    with pytest.raises(EmbeddingsUnsupported, match="'plain'"):
        await Fallbacks([plain, ChatOnly("other", None)]).embed(EmbeddingRequest("m", ("x",)))


def test_vectors_decode_from_floats_and_little_endian_float32_base64() -> None:
    assert vector_of([0.5, -1.0]) == (0.5, -1.0)
    packed = base64.b64encode(struct.pack("<3f", 1.0, 2.0, -0.25)).decode()
    assert vector_of(packed) == (1.0, 2.0, -0.25)
    with pytest.raises(ValueError, match="float32"):
        vector_of(base64.b64encode(b"12345").decode())
