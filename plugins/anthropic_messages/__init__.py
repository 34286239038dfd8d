"""The Anthropic Messages surface: ``/v1/messages`` and ``/v1/messages/count_tokens``.

The official Anthropic SDKs and Claude Code work against chatgate by pointing
``ANTHROPIC_BASE_URL`` at it, with a chatgate key as ``ANTHROPIC_API_KEY``
(``x-api-key``) or ``ANTHROPIC_AUTH_TOKEN`` (``Authorization: Bearer``); any
configured model of any provider answers. ``wire`` checks requests into core's
chat types and renders whole replies and errors, ``events`` renders streams,
``endpoint`` answers both paths as raw ASGI apps (the hot path), and ``routes``
serves ``/v1/models`` when the OpenAI surface does not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from litestar.handlers import HTTPRouteHandler
from litestar.openapi.spec import OpenAPIType, Schema
from litestar.types import ASGIApp, ControllerRouterHandler

from core import Services, Surface, documented_route, hookimpl

from .endpoint import CountTokens, Endpoint, Messages
from .options import Options
from .routes import ModelsController, unknown_messages_path

__all__ = ["AnthropicMessagesSurface", "Options"]


class AnthropicMessagesSurface(Surface):
    """Speaks Anthropic's Messages API so the official SDKs and Claude Code work unchanged.

    Promises: every error is Anthropic's body ``{"type": "error", "error": {"type",
    "message"}}`` with Anthropic's status for its type, refusals from core (key,
    balance, limits, unknown model) included; a request is charged to the key
    owner's balance exactly once, as on every surface; streams follow the SDKs'
    event contract (research/dialects.md A.10); the query string of a path
    (``?beta=true``) plays no part.
    """

    name = "anthropic_messages"
    Options = Options
    endpoints: tuple[Messages, CountTokens] | None = None

    def _endpoints(self, services: Services) -> tuple[Messages, CountTokens]:
        """The raw ASGI apps, one each for the router and the front door."""
        if self.endpoints is None:
            self.endpoints = (Messages(services, self.options), CountTokens(services, self.options))
        return self.endpoints

    def direct_routes(self, services: Services) -> Mapping[str, ASGIApp]:
        messages, count = self._endpoints(services)
        return {messages.path: messages, count.path: count}

    def route_handlers(self, services: Services) -> Sequence[ControllerRouterHandler]:
        handlers: list[ControllerRouterHandler] = [h for e in self._endpoints(services) for h in routed(e)]
        handlers.append(unknown_messages_path)
        if not serves_models(services):
            handlers.append(ModelsController)
        return handlers


def serves_models(services: Services) -> bool:
    """Whether another enabled surface (the OpenAI one) already answers ``GET /v1/models``."""
    return any(t.plugin == "openai_compat" and t.enabled for t in services.config.surfaces.values())


CREATE = (
    "Anthropic's Messages API (https://docs.claude.com/en/api/messages), streamed with `stream: true`; "
    'any configured model answers. Errors are Anthropic\'s `{"type": "error", "error": {...}}`.'
)
COUNT = 'The estimated input tokens of a Messages request (`{"input_tokens": N}`); nothing is charged.'


def routed(endpoint: Endpoint) -> list[HTTPRouteHandler]:
    """``endpoint`` in the OpenAPI schema, and through the router for the spellings the front
    door does not take (a trailing slash); the same raw ASGI app answers both."""
    required = ["model", "messages"] if endpoint.count else ["model", "messages", "max_tokens"]
    return documented_route(
        endpoint.path,
        endpoint,
        summary="Count a message's input tokens" if endpoint.count else "Create a message",
        description=COUNT if endpoint.count else CREATE,
        tags=["anthropic"],
        body=Schema(type=OpenAPIType.OBJECT, required=required),
    )


@hookimpl
def register_surfaces() -> list[type[Surface]]:
    return [AnthropicMessagesSurface]
