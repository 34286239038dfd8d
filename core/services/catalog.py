"""Which provider instance serves which model, at what price and context size."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import msgspec

from ..config import ModelConfig
from ..errors import UnknownModel, UnknownProvider
from ..fallbacks import Fallbacks
from ..provider import Provider
from ..types import ChatRequest, ProviderEvent


@dataclass(frozen=True)
class Route:
    """Where a request for ``model`` goes, and the model's configured limits and prices."""

    model: str
    config: ModelConfig
    provider: Provider

    def output_tokens(self, request: ChatRequest) -> int:
        """The most output tokens ``request`` may produce here: its :attr:`~ChatRequest.output_limit`
        (``max_tokens``, or ``max_completion_tokens``), at most the model's ``max_output_tokens``
        (which is also what a request that sets none gets)."""
        most = self.config.max_output_tokens
        asked = request.output_limit
        return most if asked is None or asked > most else asked

    def stream(self, request: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        """The provider's reply to ``request``, which asks for at most :meth:`output_tokens`.

        Every request goes upstream through here, so none asks for more than was
        reserved for it, whichever surface made it and whatever the client sent: a larger
        limit is lowered silently (as DeepSeek's clients send large ones), a missing one is
        set. A client's ``max_completion_tokens`` carries the cap too, so a provider may send
        it under the name the client used.
        """
        cap = self.output_tokens(request)
        changes: dict[str, Any] = {}
        if request.max_tokens != cap:
            changes["max_tokens"] = cap
        if "max_completion_tokens" in request.extra and request.extra["max_completion_tokens"] != cap:
            changes["extra"] = {**request.extra, "max_completion_tokens": cap}
        if changes:
            request = msgspec.structs.replace(request, **changes)
        return self.provider.stream(request)


class Catalog:
    """The models of ``[models]`` and the configured provider instances."""

    def __init__(
        self,
        models: dict[str, ModelConfig],
        providers: dict[str, Provider],
        fallbacks: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.models = models
        self.providers = providers
        chains = fallbacks or {}
        self.routing: dict[str, Provider] = {
            name: Fallbacks([p, *(providers[f] for f in chains[name])]) if chains.get(name) else p
            for name, p in providers.items()
        }
        """What a request for each instance goes to: the instance, or its fallback chain."""
        self._by_lower = {name.lower(): p for name, p in self.routing.items()}

    def route(self, model: str, provider: str | None = None) -> Route:
        """Resolve a model, optionally on an explicitly named provider instance (case-insensitive).

        Raises:
            UnknownProvider: ``provider`` is not a configured instance.
            UnknownModel: ``model`` is not in the catalog.
        """
        chosen: Provider | None = None
        if provider is not None:
            chosen = self._by_lower.get(provider.lower())
            if chosen is None:
                raise UnknownProvider(provider, sorted(self.providers))
        config = self.models.get(model)
        if config is None:
            raise UnknownModel(model, sorted(self.models))
        return Route(model, config, chosen or self.routing[config.provider])
