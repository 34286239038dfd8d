"""The OpenAI-compatible surface (seed 001): ``/v1/chat/completions`` and ``/v1/models``.

``endpoint`` answers the chat as a raw ASGI app (the hot path), ``wire`` checks its
bodies and renders its replies, ``answers`` renders errors for both; ``routes``
holds the other routes of a key holder, ``admin`` the admin API and page, and
``responses`` the refusals every Litestar route shares; ``embeddings`` is ``/v1/embeddings``, ``choices``
multiplexes the choices of ``n > 1``. ``responses_api`` is OpenAI's
Responses API (``/v1/responses``) on the same keys, translated to chat requests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from litestar import Router
from litestar.di import Provide
from litestar.types import ASGIApp, ControllerRouterHandler

from core import Embedder, Services, Surface, hookimpl

from .admin import admin_page, admin_router
from .embeddings import embeddings_route
from .endpoint import ChatCompletions
from .options import Options
from .responses import exception_handlers
from .responses_api import Responses, ResponsesController, responses_route
from .routes import OpenAIController, completions_route, key_holder

__all__ = ["OpenAICompatSurface", "Options"]


class OpenAICompatSurface(Surface):
    """Speaks OpenAI's REST shapes so the official SDKs work unchanged.

    Promises: every error answers OpenAI's error body; a request is charged
    to the key owner's balance exactly once (reserved before it goes
    upstream, settled to the tokens produced, also when the client goes
    away mid-stream); a stream that fails after it began ends with an
    ``{"error": ...}`` event, never as an empty success.
    """

    name = "openai_compat"
    Options = Options
    completions: ChatCompletions | None = None
    embedder: Embedder | None = None
    responses: Responses | None = None

    def direct_routes(self, services: Services) -> Mapping[str, ASGIApp]:
        # Also without /v1, as DeepSeek's own base URL serves it (https://api.deepseek.com).
        completions = self._completions(services)
        responses = self._responses(services)
        return {
            "/v1/chat/completions": completions,
            "/chat/completions": completions,
            "/v1/responses": responses,
            "/responses": responses,
        }

    def _embedder(self, services: Services) -> Embedder:
        """What ``POST /v1/embeddings`` embeds and bills with (one per surface)."""
        if self.embedder is None:
            self.embedder = Embedder(services.billing)
        return self.embedder

    async def open(self) -> None:
        if self.responses is not None:  # stored responses are swept while the surface is open
            await self.responses.open()

    async def aclose(self) -> None:
        if self.responses is not None:
            await self.responses.aclose()
        # Embeddings still running are settled before the store closes.
        if self.embedder is not None:
            await self.embedder.aclose()

    def _completions(self, services: Services) -> ChatCompletions:
        """The one raw ASGI app of ``/v1/chat/completions``, for the router and the front door."""
        if self.completions is None:
            self.completions = ChatCompletions(services, self.options)
        return self.completions

    def _responses(self, services: Services) -> Responses:
        """The one raw ASGI app of ``POST /v1/responses``, for the router and the front door."""
        if self.responses is None:
            self.responses = Responses(services, self.options)
        return self.responses

    def route_handlers(self, services: Services) -> Sequence[ControllerRouterHandler]:
        options: Options = self.options
        # The keys' default limits are configured here but hold on every surface (topic chat's).
        services.accounts.key_limits = options.key_limits()
        handlers: list[ControllerRouterHandler] = [
            OpenAIController,
            *completions_route(self._completions(services)),
            embeddings_route(self._embedder(services)),
            ResponsesController,
            *responses_route(self._responses(services)),
        ]
        token = services.config.server.admin_token
        if token:
            handlers += [admin_router(token), admin_page()]
        return [
            Router(
                "/",
                route_handlers=handlers,
                dependencies={
                    "options": Provide(lambda: options, use_cache=True, sync_to_thread=False),
                    "caller": Provide(key_holder),
                },
                exception_handlers=exception_handlers(services.config.server.max_body_bytes),
            )
        ]


@hookimpl
def register_surfaces() -> list[type[Surface]]:
    return [OpenAICompatSurface]
