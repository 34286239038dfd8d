"""``GET /v1/models`` (and ``/v1/models/{id}``) when the OpenAI surface is off.

The OpenAI surface serves these paths when it is enabled, with the one body
both SDK families accept (:func:`core.model_list`); without it this surface
serves the same body itself, refusing in Anthropic's error shape.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, MediaType, Request, get, route
from litestar.di import NamedDependency
from litestar.response import Response

from core import Answer, Services, Unauthenticated, model_list, model_object

from .endpoint import error


def respond(answer: Answer) -> Response[bytes]:
    """An :class:`Answer` as a Litestar response."""
    return Response(
        answer.body, status_code=answer.status, media_type=MediaType.JSON, headers=answer.headers or None
    )


async def refusal(request: Request[Any, Any, Any], services: Services) -> Response[bytes] | None:
    """401 in Anthropic's shape for a request without a valid key; None for a key holder."""
    try:
        await services.accounts.authenticate_headers(request.headers)
    except Unauthenticated as exc:
        return respond(error(401, str(exc)))
    return None


class ModelsController(Controller):
    """The models a key may name, in the body both SDK families read.

    Promises: 401 in Anthropic's error shape without a valid key; a model that
    is not configured is 404 ``not_found_error``.
    """

    path = "/v1/models"
    tags = ("anthropic",)

    @get("/", summary="List models")
    async def list_models(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services]
    ) -> Response[Any]:
        refused = await refusal(request, services)
        return refused or Response(model_list(services.catalog.models))

    @get("/{model_id:path}", summary="Retrieve a model")
    async def retrieve_model(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], model_id: str
    ) -> Response[Any]:
        refused = await refusal(request, services)
        if refused is not None:
            return refused
        name = model_id.lstrip("/")
        config = services.catalog.models.get(name)
        if config is None:
            return respond(error(404, f"model: {name}"))
        return Response(model_object(name, config))


@route(
    "/v1/messages/{rest:path}", http_method=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
)
async def unknown_messages_path(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Any other path under ``/v1/messages/`` (batches, say): 404 in Anthropic's shape, not the
    OpenAI surface's (which answers the rest of ``/v1``)."""
    return respond(error(404, f"Not found: {request.method} {request.url.path}"))
