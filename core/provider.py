"""The provider interface: one chat request in, an async stream of events out."""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

from .errors import BadRequest, Unavailable
from .plugin import Plugin
from .reply import Gathered, Reply
from .types import ChatRequest, EmbeddingRequest, Embeddings, Finish, ProviderEvent


class EmbeddingsUnsupported(BadRequest):
    """The provider has no embeddings (the default of :meth:`Provider.embed`): a 400."""

    code = "embeddings_not_supported"


class Provider(Plugin, abc.ABC):
    """Base class of model providers.

    A provider plugin subclasses this, sets ``name`` (what ``plugin = "..."``
    names in plugins.toml) and ``Options`` (a ``msgspec.Struct`` its table is
    validated against), and returns the class from the
    ``register_providers`` hook. chatgate creates one instance per configured
    provider instance (``instance`` is the table's name), calls :meth:`open`
    (acquire HTTP connection pools there) at start-up and :meth:`aclose` at
    shutdown.
    """

    @abc.abstractmethod
    def stream(self, request: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        """Generate a reply to ``request``.

        Promises:
            * yields content, reasoning and tool-call deltas in order, then
              exactly one :class:`~core.types.Finish` carrying the usage;
            * raises a :class:`~core.errors.ProviderError` subclass on failure,
              never a bare library exception;
            * stops all work (closes its upstream request) as soon as the
              consumer stops reading: implement it as an async generator whose
              ``finally`` releases the upstream, and consumers close it with
              ``contextlib.aclosing`` or by cancelling the consuming task.
        """

    def models(self) -> Sequence[str]:
        """Model names this instance serves without configuration (may be empty)."""
        return ()

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        """Embed ``request.inputs``: one vector per input, in order, with the usage.

        Optional capability: the default raises :class:`EmbeddingsUnsupported` (a 400 naming
        the provider). A provider that has embeddings overrides it, and promises: vectors of
        ``request.dimensions`` floats when that is set (or a :class:`~core.errors.BadRequest`
        saying the model cannot), usage counting the input tokens, typed
        :class:`~core.errors.ProviderError` subclasses only, and no work left running once cancelled.
        """
        raise EmbeddingsUnsupported(
            f"provider {self.instance!r} ({self.name}) has no embeddings; "
            f"route model {request.model!r} to a provider that has"
        )


async def complete(provider: Provider, request: ChatRequest) -> Reply:
    """Run ``request`` to the end and return the gathered reply."""
    gathered = Gathered()
    async with aclosing(provider.stream(request)) as events:
        async for event in events:
            gathered.add(event)
            if isinstance(event, Finish):
                return Reply(gathered.content, gathered.reasoning, gathered.tool_calls, event)
    raise Unavailable(f"provider {provider.instance!r} ended its stream without a finish event")
