"""Every topic-chat error in the seed's shape (NestJS's): ``{"statusCode", "message"}``."""

from __future__ import annotations

import logging
import math
from typing import Any

from litestar import Request
from litestar.exceptions import HTTPException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.response import Response

from core import (
    Conflict,
    ContextTooLong,
    InsufficientBalance,
    InvalidBody,
    NotFound,
    ProviderError,
    RateLimitExceeded,
    Superseded,
    Unauthenticated,
)

log = logging.getLogger("chatgate.topic_chat")


class Invalid(Exception):
    """Bad input; ``str()`` names the field and what is wrong."""


def failure(status: int, message: str, **extra: object) -> Response[dict[str, object]]:
    """The seed's error shape, with ``extra`` fields after the two it always has."""
    return Response({"statusCode": status, "message": message, **extra}, status_code=status)


def provider_status(error: ProviderError) -> int:
    """The status an upstream failure answers: the upstream's own, else 502."""
    return error.status if error.status >= 400 else 502


class Failures:
    """The exception handler of every topic-chat route.

    Promises: bad input is 400, a missing or unknown key 401, an empty balance
    403, someone else's or a missing topic 404, a clash with a running reply
    409, a rate limit 429 with ``Retry-After``, an upstream failure its own
    status; anything unexpected is a logged 500 that names only its type.
    """

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes

    def __call__(self, request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, object]]:
        match exc:
            case Invalid() | InvalidBody() | ContextTooLong():
                return failure(400, str(exc))
            case Unauthenticated():
                return failure(401, str(exc))
            case InsufficientBalance():
                return failure(403, "your balance is used up; ask the operator to top it up")
            case RateLimitExceeded():
                response = failure(429, str(exc))
                response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
                return response
            case NotFound():
                return failure(404, str(exc))
            case Conflict() | Superseded():
                return failure(409, str(exc))
            case ProviderError():
                return failure(provider_status(exc), exc.message)
            case RequestEntityTooLarge():
                limit = self.max_body_bytes
                return failure(413, f"the request body is larger than this server's limit of {limit} bytes")
            case HTTPException():
                return failure(exc.status_code, exc.detail)
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return failure(500, f"internal error ({type(exc).__name__}); the server log has the details")
