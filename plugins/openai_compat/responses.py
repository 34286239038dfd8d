"""The surface's answers as Litestar responses, and its refusals in OpenAI's shape.

A handler, guard or dependency raises :class:`Refused`; the handlers of
:func:`exception_handlers`, mounted over every route of the surface, answer it
and Litestar's own refusals (an oversized body, a wrong method) with
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Any

from litestar import MediaType, Request
from litestar.exceptions import HTTPException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.response import Response
from litestar.types import ExceptionHandlersMap

from core import Answer

from .answers import error


class Refused(Exception):
    """A request refused with OpenAI's error body (type ``invalid_request_error``)."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.answer = error(status, message, "invalid_request_error", code, param)


def respond(answer: Answer) -> Response[bytes]:
    """An :class:`Answer` as a Litestar response."""
    return Response(
        answer.body, status_code=answer.status, media_type=MediaType.JSON, headers=answer.headers or None
    )


def exception_handlers(limit: int) -> ExceptionHandlersMap:
    """:class:`Refused` and Litestar's own refusals in OpenAI's shape (``limit``: the body limit)."""

    def refused(_: Request[Any, Any, Any], exc: Refused) -> Response[bytes]:
        return respond(exc.answer)

    def http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
        message = exc.detail
        if isinstance(exc, RequestEntityTooLarge):
            message = f"The request body is larger than this server's limit of {limit} bytes."
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return respond(error(exc.status_code, message, type_, None, headers=exc.headers))

    return {HTTPException: http_error, Refused: refused}
