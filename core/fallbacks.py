"""Fallback chains: provider instances tried in order when one fails before replying."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any

from .errors import ProviderError
from .provider import EmbeddingsUnsupported, Provider
from .types import ChatRequest, EmbeddingRequest, Embeddings, ProviderEvent

log = logging.getLogger("chatgate.fallbacks")


class Fallbacks(Provider):
    """A provider instance followed by the instances to try when it fails.

    Promises: the next instance is tried only when the current one raised a
    *retryable* :class:`~core.errors.ProviderError` before producing any
    event (its own retries, if it has any, are already spent by then); once
    an instance has produced an event, its failure is final, so a reply is
    never stitched together from two models. The last instance's error is
    raised when every one failed. Chains are not followed transitively: an
    instance's own fallbacks apply only when it is the one requested.

    It owns nothing: the instances are opened and closed by the app.
    """

    name = "fallbacks"

    def __init__(self, chain: Sequence[Provider]) -> None:
        if len(chain) < 2:
            raise ValueError("a fallback chain needs a provider and at least one fallback")
        super().__init__(chain[0].instance, chain[0].options)
        self.chain = tuple(chain)

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        last = len(self.chain) - 1
        for position, provider in enumerate(self.chain):
            produced = False
            try:
                async with aclosing(provider.stream(request)) as events:
                    async for event in events:
                        produced = True
                        yield event
                return
            except ProviderError as exc:
                if produced or not exc.retryable or position == last:
                    raise
                log.warning(
                    "provider %r failed before replying (%s); falling back to %r",
                    provider.instance,
                    exc,
                    self.chain[position + 1].instance,
                )

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        # The same rule as replies: the next instance only after a retryable failure. A member
        # without embeddings is skipped: it is a fallback for chat, not for vectors.
        failure: ProviderError | None = None
        for provider in self.chain:
            try:
                return await provider.embed(request)
            except EmbeddingsUnsupported as exc:
                failure = failure or exc  # a retryable failure before it says more than this
            except ProviderError as exc:
                if not exc.retryable:
                    raise
                log.warning("provider %r failed to embed (%s)", provider.instance, exc)
                failure = exc
        assert failure is not None  # a chain has at least one member
        raise failure

    def models(self) -> Sequence[str]:
        return self.chain[0].models()

    def describe(self) -> dict[str, Any]:
        return {**self.chain[0].describe(), "fallbacks": [p.instance for p in self.chain[1:]]}
