"""Who is calling: API keys and email identities."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec

from ..errors import InvalidEmail, NotAllowed, Unauthenticated
from ..records import ApiKey, RateLimits, User
from ..store import Store

KEY_PREFIX = "sk-cg-"
PREFIX_LENGTH = len(KEY_PREFIX) + 6


def hash_key(secret: str) -> str:
    """The stored form of a key. Keys carry 256 random bits, so a fast hash is enough."""
    return hashlib.sha256(secret.encode()).hexdigest()


EMAIL = re.compile(r"[^@\s]+@[^@\s]+")


def normalize_email(email: str) -> str:
    return email.strip().lower()


def checked_email(email: str) -> str:
    """``email`` normalized, or :class:`InvalidEmail` when it is not an address."""
    normal = normalize_email(email)
    if not EMAIL.fullmatch(normal):
        raise InvalidEmail(f"{email!r} is not an email address")
    return normal


def email_allowed(email: str, patterns: Sequence[str]) -> bool:
    """Whether ``email`` matches an allow-list of exact addresses, ``*@domain`` patterns or ``*``."""
    email = normalize_email(email)
    domain = email.rpartition("@")[2]
    for pattern in patterns:
        pattern = normalize_email(pattern)
        if pattern == "*" or pattern == email or (pattern.startswith("*@") and pattern[2:] == domain):
            return True
    return False


class KeyLimits(msgspec.Struct, forbid_unknown_fields=True):
    """The rate limits of every API key that sets none of its own (0: no limit).

    Configured in ``[surfaces.openai_compat]``; they apply to a key's requests on
    every surface, counted together.
    """

    requests_per_minute: int = 120
    """Default limit of each key (a key's own limit replaces it); 0: no limit."""
    tokens_per_minute: int = 400_000
    """Default limit of prompt plus completion tokens per key per minute; 0: no limit."""
    concurrent_requests: int = 16
    """Default limit of requests in flight per key; 0: no limit."""

    def __post_init__(self) -> None:
        for field in ("requests_per_minute", "tokens_per_minute", "concurrent_requests"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} to be >= 0 (0: no limit)")

    def limits_for(self, key: ApiKey | None) -> RateLimits:
        """The limits a key works under: its own where set, else these defaults (0: none)."""
        own = key.limits if key is not None else RateLimits()

        def pick(field: str) -> int | None:
            value = getattr(own, field)
            value = getattr(self, field) if value is None else value
            return value or None

        return RateLimits(
            requests_per_minute=pick("requests_per_minute"),
            tokens_per_minute=pick("tokens_per_minute"),
            concurrent_requests=pick("concurrent_requests"),
        )


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: the user, and the key used when there was one."""

    user: User
    key: ApiKey | None = None


class Accounts:
    """Users and their API keys.

    Promises: an authenticated key is remembered for ``key_cache_seconds``
    (a store round trip per request was the largest part of the latency
    chatgate adds), so a key revoked or re-limited through this process
    takes effect at once and one changed by another process (another worker,
    the CLI) within that time. Unknown keys are never remembered: a new key
    works at once. A remembered caller's balance may be that old too; read
    the user for a balance to show.
    """

    key_cache_seconds: float = 2.0

    def __init__(self, store: Store) -> None:
        self.store = store
        self._callers: dict[str, tuple[float, Caller]] = {}  # key hash -> (until, caller)
        self.key_limits = KeyLimits()
        """The keys' default limits: the surface whose options configure them sets them
        (openai_compat's); until then, and without it, :class:`KeyLimits`' defaults."""

    def limits_for(self, key: ApiKey | None) -> RateLimits:
        """The rate limits a key's request works under, on every surface alike."""
        return self.key_limits.limits_for(key)

    async def create_key(self, email: str, name: str = "") -> tuple[ApiKey, str]:
        """Create a key for the user with ``email`` (created if new). The secret is returned only here."""
        user = await self.store.ensure_user(checked_email(email))
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = await self.store.create_api_key(user.id, name, secret[:PREFIX_LENGTH], hash_key(secret))
        return key, secret

    async def authenticate(self, secret: str) -> Caller | None:
        """The caller a key belongs to, or None when it is unknown or revoked."""
        if not secret.startswith(KEY_PREFIX):
            return None
        digest = hash_key(secret)
        now = time.monotonic()
        remembered = self._callers.get(digest)
        if remembered is not None and remembered[0] > now:
            return remembered[1]
        found = await self.store.find_api_key_owner(digest)
        if found is None or not found[0].active:
            self._callers.pop(digest, None)
            return None
        key, user = found
        caller = Caller(user, key)
        if len(self._callers) >= 10_000:  # only valid keys get here; drop the expired ones
            self._callers = {h: r for h, r in self._callers.items() if r[0] > now}
        self._callers[digest] = (now + self.key_cache_seconds, caller)
        return caller

    async def authenticate_headers(self, headers: Mapping[str, str]) -> Caller:
        """The caller of a request, from ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

        Raises:
            Unauthenticated: no key (``missing``), or an unknown or revoked one.
        """
        secret = api_key_from(headers)
        if secret is None:
            raise Unauthenticated(
                "no API key: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'", missing=True
            )
        caller = await self.authenticate(secret)
        if caller is None:
            raise Unauthenticated("the API key is not valid (unknown or revoked)", missing=False)
        return caller

    async def ensure_user(self, email: str) -> User:
        """The user with ``email``, created if new (operators create users; no allow-list applies).

        Raises:
            InvalidEmail: ``email`` is not an address.
        """
        return await self.store.ensure_user(checked_email(email))

    async def get_user(self, user_id: int) -> User:
        """The user with ``user_id``; ``NotFound`` otherwise."""
        return await self.store.get_user(user_id)

    async def list_users(self) -> list[User]:
        return await self.store.list_users()

    async def list_keys(self, user_id: int | None = None) -> list[ApiKey]:
        """Keys (never their secrets), of one user or of everyone."""
        return await self.store.list_api_keys(user_id)

    async def revoke_key(self, key_id: int) -> ApiKey:
        """Revoke a key at once: its next request is refused. ``NotFound`` for an unknown id."""
        key = await self.store.revoke_api_key(key_id)
        self._forget(key_id)
        return key

    async def set_limits(self, key_id: int, limits: RateLimits) -> ApiKey:
        """Replace a key's own rate limits (unset fields fall back to the configured defaults)."""
        key = await self.store.set_api_key_limits(key_id, limits)
        self._forget(key_id)
        return key

    def _forget(self, key_id: int) -> None:
        self._callers = {h: r for h, r in self._callers.items() if r[1].key is None or r[1].key.id != key_id}

    async def find_user(self, email: str) -> User | None:
        """The user with ``email``, or None; never creates one."""
        return await self.store.find_user(normalize_email(email))

    async def user_for_email(self, email: str, allow: Sequence[str]) -> User:
        """The user with ``email``, created on first use, if ``allow`` admits the address.

        Raises:
            InvalidEmail: ``email`` is not an address.
            NotAllowed: the address matches no pattern of ``allow``; no user is created.
        """
        email = checked_email(email)
        if not email_allowed(email, allow):
            raise NotAllowed(f"{email} is not on the allow-list")
        return await self.store.ensure_user(email)


def api_key_from(headers: Mapping[str, str]) -> str | None:
    """The key a request carries in ``Authorization: Bearer`` or ``X-API-Key``, or None."""
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = (headers.get("x-api-key") or "").strip()
    return key or None
