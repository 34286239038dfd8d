"""Decoding JSON request bodies: every way a body can be wrong is one typed 400.

msgspec raises ``DecodeError`` for text that is not JSON, ``ValidationError``
for JSON of the wrong shape, and ``RecursionError`` (not a ``DecodeError``)
for arrays or objects nested deeper than the interpreter's recursion limit:
``[[[[...`` fifty thousand deep is a few hundred kilobytes, so any client can
send one. :func:`decode_body` turns all three into :class:`InvalidBody`,
which each surface renders in its own error shape; :func:`nested_too_deeply`
does the same for bodies Litestar decodes itself (a handler's ``data``).
"""

from __future__ import annotations

import logging
import re
from typing import Any, TypeVar, overload

import msgspec
from litestar import Request
from litestar.exceptions import ClientException, HTTPException
from litestar.response import Response
from litestar.types import ExceptionHandler, ExceptionHandlersMap

from .errors import InvalidBody

T = TypeVar("T")

log = logging.getLogger("chatgate")

TOO_DEEP = (
    "the request body nests arrays or objects too deeply to be read (keep it under a few hundred levels)"
)
_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_NAMED = re.compile(r"^Object (?:missing required|contains unknown) field `([^`]+)`")


@overload
def decode_body(raw: bytes) -> Any: ...
@overload
def decode_body(raw: bytes, type: type[T]) -> T: ...
def decode_body(raw: bytes, type: Any = Any) -> Any:
    """``raw`` decoded as JSON (into ``type`` when given).

    Raises:
        InvalidBody: the body is empty (a client that sends nothing meant to send
            something: no surface takes an empty JSON body), not JSON, nested too
            deeply, or (with ``type``) not of that type; its message names the field.
    """
    if not raw.strip():
        raise InvalidBody("the request body is empty; expected a JSON object", reason="empty")
    try:
        return msgspec.json.decode(raw, type=type)
    except msgspec.ValidationError as exc:
        raise shape_error(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidBody(f"the request body is not valid JSON ({exc})", reason="syntax") from None
    except RecursionError:
        raise InvalidBody(TOO_DEEP, reason="depth") from None


def shape_error(message: str) -> InvalidBody:
    """msgspec's validation ``message`` with the field it is about named first."""
    where = _AT.search(message)
    path = where.group(1) if where else ""
    detail = message[: where.start()] if where else message
    named = _NAMED.match(detail)
    if named:
        path = f"{path}.{named.group(1)}" if path else named.group(1)
    field = path or None
    said = f"invalid field '{field}': {detail}" if field else f"invalid request body: {detail}"
    return InvalidBody(said, reason="shape", field=field)


def nested_too_deeply(request: Request[Any, Any, Any], exc: RecursionError) -> Response[Any]:
    """The app's handler of ``RecursionError``: Litestar's own body decoding (a handler's
    ``data``, ``request.json()``) lets msgspec's escape as a 500 with a traceback.

    One raised straight out of Litestar's code while it decoded is the client's deep
    body: answered as a 400 :class:`~litestar.exceptions.ClientException` by the
    route's own handler of it, so in its surface's error shape. Any other recursion
    is a bug: it goes to the route's handler of the error as it would without this one.
    """
    route = request.scope.get("route_handler")
    resolved = route.resolve_exception_handlers() if route is not None else {}
    handlers = {k: v for k, v in resolved.items() if k is not RecursionError}
    error: Exception = ClientException(detail=TOO_DEEP) if _raised_by_litestar(exc) else exc
    handler = _handler_for(handlers, error)
    if handler is not None:
        answer: Response[Any] = handler(request, error)
        return answer
    if isinstance(error, ClientException):
        return Response({"status_code": 400, "detail": TOO_DEEP}, status_code=400)
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return Response({"status_code": 500, "detail": "Internal Server Error"}, status_code=500)


def _handler_for(handlers: ExceptionHandlersMap, exc: Exception) -> ExceptionHandler[Any] | None:
    """The handler Litestar would pick for ``exc``: by status code first, then by class."""
    if isinstance(exc, HTTPException) and exc.status_code in handlers:
        return handlers[exc.status_code]
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None


def _raised_by_litestar(exc: BaseException) -> bool:
    """Whether the innermost Python frame of ``exc`` is Litestar's (msgspec is C: no frame of its own)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")).startswith("litestar.")
