"""Who may use the email surface: an email is an identity by its address alone.

With ``allow`` unset only callers on this machine are admitted (:func:`local_caller`);
with it set the allow-list decides. Bodies must be declared JSON (:func:`json_content`),
so a web page cannot drive a local server.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from litestar import Request

from core import email_allowed

PROXY_HEADERS = frozenset(
    {
        b"forwarded",
        b"forwarded-for",
        b"via",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-forwarded-port",
        b"x-real-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
        b"cf-connecting-ip",
        b"true-client-ip",
    }
)
"""Headers a proxy adds to what it passes on (lowercase, as ASGI names them): any of them and
the caller is not taken for local. nginx's plain ``proxy_pass`` adds none, so such a proxy must
be told to send ``X-Forwarded-For``."""


class Refused(Exception):
    """An email the allow-list does not admit (403); ``str()`` says so."""


class Unsupported(Exception):
    """A body that is not declared JSON (415): a page of another site can post a form or
    ``text/plain`` to a local server without asking, but not JSON."""


def json_content(request: Request[Any, Any, Any]) -> None:
    """:class:`Unsupported` unless the body is declared ``application/json`` or ``application/*+json``."""
    declared = request.headers.get("content-type", "")
    media = declared.partition(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        shown = repr(media[:60]) if media else "none"
        raise Unsupported(f"the body must be JSON sent as Content-Type: application/json (got {shown})")


def local_caller(request: Request[Any, Any, Any]) -> bool:
    """Whether the caller is on this machine: its client address is loopback (or it came over a
    Unix socket) and it carries no proxy header.

    The client address, not the address the server listens on: behind a reverse proxy on the
    same host every request arrives on loopback. A proxy header means someone else's request
    was passed on, whoever passed it.
    """
    # One pass over the raw header names, each a set lookup: cheap on every request.
    if any(name in PROXY_HEADERS for name, _ in request.scope["headers"]):
        return False
    client = request.scope.get("client")
    if not client:
        return True
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def admit(request: Request[Any, Any, Any], email: str, allow: list[str] | None) -> None:
    """:class:`Refused` unless ``allow`` admits ``email`` (unset: :func:`local_caller` decides)."""
    if allow is None:
        allow = ["*"] if local_caller(request) else []
    if not email_allowed(email, allow):
        raise Refused(f"{email} is not allowed to use this service; ask the operator to add it")
