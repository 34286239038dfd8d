"""Comparing and hiding credentials: the admin token, upstream API keys, passwords in URLs."""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "[redacted]"

_TOKEN = re.compile(r"[A-Za-z0-9_\-+/=.*~…]+")
"""A run of the characters keys are made of, plus those servers mask them with (``*``, ``.``, ``…``)."""
_MASK = re.compile(r"[*.…~]+")
_SECRET_PARAM = re.compile(r"key|token|secret|passw|sig|auth", re.IGNORECASE)
SHARED = 6
"""A token sharing this many consecutive characters with a secret is taken for (part of) it."""
EDGE = 4
"""A masked token's visible piece this long that begins or ends a secret gives it away too."""


def bearer_matches(authorization: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <token>``, compared in constant time
    (the admin API and ``/healthz`` details take the admin token this way)."""
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def url_credentials(url: str) -> tuple[str, str] | None:
    """The ``user:password`` a URL carries (``https://user:pass@host/``), or None."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return None
    userinfo = parts.netloc.rpartition("@")[0]
    user, _, password = userinfo.partition(":")
    return user, password


def without_credentials(url: str) -> str:
    """``url`` with its credentials replaced by ``***``: the ``user:password@`` part, and the values
    of query parameters named like secrets (``?api_key=``, ``?token=``, ``?sig=``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class Redactor:
    """Hides secrets in text that is shown to a client or written to a log.

    Promises: the text comes back with every token (a run of key characters,
    ``*``/``.`` masks included) replaced by ``[redacted]`` that holds a secret,
    shares :data:`SHARED` consecutive characters with one, or shows a piece of
    :data:`EDGE` or more characters that begins or ends one. That covers the
    forms servers echo a key in: whole, ``sk-abc***xyz``, ``****cdef``,
    ``sk-proj-****...ABCD``. Secrets shorter than :data:`EDGE` are not
    looked for (they would match ordinary words).
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = sorted({s for s in secrets if len(s) >= EDGE}, key=len, reverse=True)
        self.pieces = {
            s[i : i + min(SHARED, len(s))] for s in self.secrets for i in range(len(s) - SHARED + 1)
        }
        self.pieces |= {s for s in self.secrets if len(s) < SHARED}

    def __call__(self, text: str) -> str:
        if not self.secrets:
            return text
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return _TOKEN.sub(self._token, text)

    def _token(self, match: re.Match[str]) -> str:
        token = match.group()
        return REDACTED if self.gives_away(token) else token

    def gives_away(self, token: str) -> bool:
        """Whether ``token`` holds a piece of a secret by the rules above."""
        if token == REDACTED.strip("[]"):
            return False
        for size in {min(SHARED, len(s)) for s in self.secrets}:
            if any(token[i : i + size] in self.pieces for i in range(len(token) - size + 1)):
                return True
        for piece in _MASK.split(token):
            if len(piece) >= EDGE and any(s.startswith(piece) or s.endswith(piece) for s in self.secrets):
                return True
        return False
