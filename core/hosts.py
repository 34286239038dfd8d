"""Which ``Host`` names the gateway answers: the defence against DNS rebinding.

A web page on ``evil.example`` can make a browser send requests to a chatgate on the
visitor's own machine by re-pointing ``evil.example`` at 127.0.0.1; the browser then
treats chatgate as ``evil.example``'s own origin and lets the page read the answers.
Such a request still carries ``Host: evil.example``: refusing Host names the operator
did not name defeats it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from litestar.types import HTTPScope, Send

LOOPBACK_NAMES = frozenset({"localhost"})
CACHED_DECISIONS = 1024
"""Distinct Host values whose decision is remembered; past it, each is decided afresh (a
client inventing names costs a parse per request, not memory)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, without port) is the machine itself only."""
    name = host.strip().strip("[]").lower().rstrip(".")
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The lower-case name of a ``Host`` header value, without port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        end = value.find("]")
        return value[1:end] if end > 0 else value
    name, _, _ = value.partition(":")
    return name.rstrip(".")


def host_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid ``allowed_hosts`` entry, or None when it is."""
    if pattern == "*":
        return None
    name = pattern[2:] if pattern.startswith("*.") else pattern
    if not name or any(c.isspace() or c in "/@?#*," for c in name):
        return f"a host name, an IP address, *.domain or * (found {pattern!r})"
    return None


class HostCheck:
    """Decides, per ``Host`` header value, whether a request is answered.

    Promises: loopback names (``localhost``, 127.x.y.z, ``[::1]``, any port) are always
    admitted, and so is a request without ``Host`` (no browser sends one); other names only
    when ``allowed`` lists them exactly or matches them with a ``*.domain`` pattern (a
    subdomain, not ``domain`` itself), compared case-insensitively, port ignored.
    """

    def __init__(self, allowed: Sequence[str]) -> None:
        self.exact = frozenset(host_name(p) for p in allowed if not p.startswith("*."))
        self.suffixes = tuple("." + host_name(p[2:]) for p in allowed if p.startswith("*."))
        self.decisions: dict[bytes, bool] = {}

    @classmethod
    def for_server(cls, listen_host: str, allowed: Sequence[str]) -> HostCheck | None:
        """The check a server listening on ``listen_host`` applies; None when it applies none.

        With ``allowed`` empty, only a server on a loopback address checks (it is the one a
        browser on the same machine can be turned against); ``"*"`` in ``allowed`` turns
        the check off.
        """
        if "*" in allowed or not (allowed or is_loopback(listen_host)):
            return None
        return cls(allowed)

    def admits(self, scope: HTTPScope) -> bool:
        for name, value in scope["headers"]:
            if name == b"host":  # clients send it first: the loop ends at once
                decision = self.decisions.get(value)
                if decision is None:
                    decision = self.decide(value)
                    if len(self.decisions) < CACHED_DECISIONS:
                        self.decisions[value] = decision
                return decision
        return True

    def decide(self, value: bytes) -> bool:
        name = host_name(value.decode("latin-1"))
        return (
            is_loopback(name) or name in self.exact or (bool(self.suffixes) and name.endswith(self.suffixes))
        )

    async def refuse(self, scope: HTTPScope, send: Send) -> None:
        """Answer 400 in plain text: the check runs before any surface (and its error shape) is
        chosen, and whoever meets it (an operator behind a new proxy name) reads it in a browser
        or curl verbatim."""
        host = next((v for n, v in scope["headers"] if n == b"host"), b"").decode("latin-1")
        shown = host if len(host) <= 100 else host[:100] + "..."
        body = (
            f"400 Bad Request: this server does not answer to Host {shown!r}; "
            "add the name to [server] allowed_hosts in plugins.toml to serve it.\n"
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-content-type-options", b"nosniff"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})
