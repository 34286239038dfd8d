"""``POST /v1/embeddings`` in OpenAI's shapes, for models configured ``kind = "embedding"``.

The request is checked field by field (a bad one answers 400 naming it, nothing charged),
routed like a chat request (``X-AI-Provider``, then the model), admitted within the key's
limits and balance, and embedded by the provider (:meth:`core.Provider.embed`), charged
at the model's ``input_price`` for the input tokens (:class:`core.Embedder`). The vectors
go back as floats, or as base64 of little-endian float32 when ``encoding_format`` is
``"base64"``, which the openai SDKs ask for by default and decode themselves.
"""

from __future__ import annotations

import base64
import logging
import struct
from typing import Any

from litestar import Request, post
from litestar.di import NamedDependency
from litestar.handlers import HTTPRouteHandler
from litestar.response import Response

from core import (
    Caller,
    Embedder,
    EmbeddingRequest,
    InsufficientBalance,
    InvalidBody,
    OutOfStanding,
    ProviderError,
    RateLimitExceeded,
    Services,
    UnknownModel,
    UnknownProvider,
    decode_body,
    json_answer,
)

from .answers import error, provider_error, rate_headers, rate_limited
from .options import Options
from .responses import respond
from .wire import Invalid, missing, wrong_type

log = logging.getLogger("chatgate.openai_compat")

MAX_INPUTS = 2048
"""The most inputs one request may embed (OpenAI's bound)."""

ENCODINGS = ("float", "base64")
KNOWN = frozenset({"model", "input", "encoding_format", "dimensions", "user"})


class Parsed:
    """A checked embeddings request and how the client wants its vectors."""

    __slots__ = ("encoding", "request")

    def __init__(self, request: EmbeddingRequest, encoding: str) -> None:
        self.request = request
        self.encoding = encoding


def parse(raw: bytes) -> Parsed:
    """Check a request body; raise :class:`~.wire.Invalid` naming the first bad field."""
    try:
        body = decode_body(raw)
    except InvalidBody as exc:
        raise Invalid(
            f"We could not parse the JSON body of your request ({exc}).", None, "invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise Invalid("The request body must be a JSON object.", None, "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Invalid(
            "you must provide a model parameter (a non-empty string)", "model", "missing_required_parameter"
        )
    inputs = _inputs(body.get("input"))
    encoding = body.get("encoding_format")
    if encoding is None:
        encoding = "float"
    if encoding not in ENCODINGS:
        raise Invalid(
            f"Invalid value for 'encoding_format': expected 'float' or 'base64', got {encoding!r}.",
            "encoding_format",
            "invalid_value",
        )
    dimensions = body.get("dimensions")
    if dimensions is not None:
        if not isinstance(dimensions, int) or isinstance(dimensions, bool):
            raise wrong_type("dimensions", "an integer", dimensions)
        if dimensions < 1:
            raise Invalid(
                f"Invalid 'dimensions': expected a value >= 1, but got {dimensions} instead.",
                "dimensions",
                "integer_below_min_value",
            )
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise wrong_type("user", "a string", user)
    extra = {k: v for k, v in body.items() if k not in KNOWN and v is not None}
    request = EmbeddingRequest(model=model, inputs=inputs, dimensions=dimensions, user=user, extra=extra)
    return Parsed(request, encoding)


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _inputs(value: Any) -> tuple[str | tuple[int, ...], ...]:
    """``input`` as a tuple of texts or token arrays: a string, strings, a token array, token arrays."""
    expected = "a string, an array of strings, an array of tokens or an array of token arrays"
    if value is None:
        raise missing("input")
    if isinstance(value, str):
        if not value:
            raise Invalid(
                "Invalid 'input': the string is empty; give text to embed.", "input", "invalid_value"
            )
        return (value,)
    if not isinstance(value, list):
        raise wrong_type("input", expected, value)
    if not value:
        raise Invalid("Invalid 'input': empty array. Expected at least one input.", "input", "invalid_value")
    if len(value) > MAX_INPUTS:
        raise Invalid(
            f"Invalid 'input': {len(value)} inputs, more than the {MAX_INPUTS} allowed in one request.",
            "input",
            "invalid_value",
        )
    if all(_is_token(v) for v in value):
        return (tuple(value),)
    items: list[str | tuple[int, ...]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if isinstance(item, str):
            if not item:
                raise Invalid(f"Invalid '{where}': the string is empty.", where, "invalid_value")
            items.append(item)
        elif isinstance(item, list) and item and all(_is_token(t) for t in item):
            items.append(tuple(item))
        else:
            what = "a non-empty string or a non-empty array of tokens (integers >= 0)"
            raise Invalid(f"Invalid '{where}': expected {what}.", where, "invalid_type")
    if len({type(item) for item in items}) > 1:
        raise Invalid(f"Invalid 'input': expected {expected}, not a mix.", "input", "invalid_type")
    return tuple(items)


def encoded(vector: tuple[float, ...], encoding: str) -> list[float] | str:
    """A vector as the client asked for it: floats, or base64 of little-endian float32."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return list(vector)


def embeddings_route(embedder: Embedder) -> HTTPRouteHandler:
    """``POST /v1/embeddings`` (also without ``/v1``), embedding with ``embedder``."""

    @post(
        ["/v1/embeddings", "/embeddings"],
        summary="Create embeddings",
        description=(
            'OpenAI\'s embeddings for models configured with kind = "embedding"; floats or base64 '
            "(encoding_format). Charged at the model's input_price per input token."
        ),
        tags=["openai"],
        status_code=200,
    )
    async def create_embeddings(
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        options: NamedDependency[Options],
        caller: NamedDependency[Caller],
    ) -> Response[bytes]:
        try:
            return await answer(request, services, options, caller)
        except Exception as exc:  # OpenAI's error body even for what nobody foresaw
            log.exception("POST /v1/embeddings failed")
            message = f"chatgate failed to answer ({type(exc).__name__}); see its log."
            return respond(error(500, message, "server_error", None))

    async def answer(
        request: Request[Any, Any, Any], services: Services, options: Options, caller: Caller
    ) -> Response[bytes]:
        try:
            parsed = parse(await request.body())
        except Invalid as exc:
            return respond(error(400, exc.message, "invalid_request_error", exc.code, exc.param))
        asked = parsed.request
        try:
            route = services.catalog.route(asked.model, request.headers.get("x-ai-provider"))
        except UnknownProvider as exc:
            return respond(error(400, str(exc), "invalid_request_error", "unknown_provider"))
        except UnknownModel:
            message = f"The model '{asked.model}' does not exist or you do not have access to it."
            return respond(error(404, message, "invalid_request_error", "model_not_found", "model"))
        if route.config.kind != "embedding":
            message = (
                f"The model '{asked.model}' is not an embedding model (its [models] table sets no "
                'kind = "embedding"); embed with one that is.'
            )
            return respond(error(400, message, "invalid_request_error", "model_not_supported", "model"))
        most = route.config.context_tokens
        for i, item in enumerate(asked.inputs):
            tokens = Embedder.input_tokens(item)
            if tokens > most:
                where = "input" if len(asked.inputs) == 1 else f"input[{i}]"
                message = (
                    f"This model's maximum input length is {most} tokens; {where} has about {tokens}. "
                    "Please shorten it."
                )
                return respond(error(400, message, "invalid_request_error", "context_length_exceeded", where))
        limits = options.limits_for(caller.key)
        try:
            result, use = await embedder.embed(caller, route, asked, limits)
        except RateLimitExceeded as exc:
            return respond(rate_limited(exc, limits))
        except InsufficientBalance as exc:
            return respond(error(403, str(exc), "insufficient_quota", "insufficient_user_quota"))
        except OutOfStanding as exc:
            return respond(error(503, str(exc), "server_error", exc.code, headers={"Retry-After": "1"}))
        except ProviderError as exc:
            return respond(provider_error(exc))
        data = [
            {"object": "embedding", "index": i, "embedding": encoded(vector, parsed.encoding)}
            for i, vector in enumerate(result.vectors)
        ]
        tokens = result.usage.prompt_tokens
        body = {
            "object": "list",
            "data": data,
            "model": asked.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return respond(json_answer(body, headers=rate_headers(limits, use)))

    return create_embeddings
