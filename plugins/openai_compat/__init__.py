"""The OpenAI-compatible surface (seed 001): ``/v1/models`` and, in time, ``/v1/chat/completions``."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from litestar import Request, get
from litestar.response import Response
from litestar.types import ControllerRouterHandler

from core.errors import Unauthenticated
from core.hookspecs import hookimpl
from core.services.accounts import Caller
from core.surface import Surface

CREATED = 1_735_689_600  # 2025-01-01: a fixed, honest "created" for configured models


class Options(msgspec.Struct, forbid_unknown_fields=True):
    """``[surfaces.openai_compat]`` options."""

    owned_by: str = "chatgate"
    """What ``/v1/models`` reports as each model's owner."""


def error(
    status: int, message: str, type_: str, code: str | None, param: str | None = None
) -> Response[object]:
    """OpenAI's error body."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Response(body, status_code=status)


class OpenAICompatSurface(Surface):
    """Speaks OpenAI's REST shapes so the official SDKs work unchanged."""

    name = "openai_compat"
    Options = Options

    def route_handlers(self) -> Sequence[ControllerRouterHandler]:
        services = self.services
        owned_by = self.options.owned_by

        async def authenticate(request: Request[object, object, object]) -> Caller | Response[object]:
            try:
                return await services.accounts.authenticate_headers(request.headers)
            except Unauthenticated as exc:
                code = "missing_api_key" if exc.missing else "invalid_api_key"
                return error(401, str(exc), "invalid_request_error", code)

        def model_object(name: str) -> dict[str, object]:
            return {"id": name, "object": "model", "created": CREATED, "owned_by": owned_by}

        @get("/v1/models", tags=["openai"], summary="List models")
        async def list_models(request: Request[object, object, object]) -> Response[object]:
            caller = await authenticate(request)
            if isinstance(caller, Response):
                return caller
            data = [model_object(name) for name in services.catalog.models]
            return Response({"object": "list", "data": data})

        @get("/v1/models/{model_id:path}", tags=["openai"], summary="Retrieve a model")
        async def retrieve_model(request: Request[object, object, object], model_id: str) -> Response[object]:
            caller = await authenticate(request)
            if isinstance(caller, Response):
                return caller
            name = model_id.lstrip("/")
            if name not in services.catalog.models:
                return error(
                    404,
                    f"The model '{name}' does not exist",
                    "invalid_request_error",
                    "model_not_found",
                    "model",
                )
            return Response(model_object(name))

        return [list_models, retrieve_model]


@hookimpl
def register_surfaces() -> list[type[Surface]]:
    return [OpenAICompatSurface]
