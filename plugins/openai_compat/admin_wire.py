"""The admin API's shapes: request bodies decoded into structs, records rendered as JSON objects."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from core import ApiKey, InvalidBody, RateLimits, UsageDay, User, decode_body, format_amount, parse_amount

from .responses import Refused

S = TypeVar("S", bound=msgspec.Struct)


class KeyRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /admin/api/keys``: the owner's email, a name, and limits of its own (none: the defaults)."""

    email: str
    name: str = ""
    limits: RateLimits | None = None


class UserRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /admin/api/users``: an email and its opening balance."""

    email: str
    balance: str | float = "0"


class TopUpRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /admin/api/users/{id}/topup``: credits to add (negative: to take away)."""

    amount: str | float
    note: str | None = None


class LimitsRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``PATCH /admin/api/keys/{id}``: the key's own limits."""

    limits: RateLimits


def decode(raw: bytes, struct: type[S]) -> S:
    """``raw`` decoded into ``struct``, or a 400 naming the field."""
    try:
        return decode_body(raw, struct)
    except InvalidBody as exc:
        code = "invalid_value" if exc.reason == "shape" else "invalid_json"
        raise Refused(400, f"Invalid request: {exc}", code, exc.field) from None


def amount(value: str | float, field: str) -> int:
    """``value`` in micro-credits, or a 400 naming ``field``."""
    try:
        return parse_amount(value)
    except ValueError as exc:
        raise Refused(400, f"Invalid '{field}': {exc}", "invalid_value", field) from None


def user_body(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "email": user.email,
        "balance": format_amount(user.balance),
        "created_at": user.created_at.isoformat(),
    }


def key_body(key: ApiKey, email: str | None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": key.id,
        "user_id": key.user_id,
        "email": email,
        "name": key.name,
        "prefix": key.prefix,
        "active": key.active,
        "created_at": key.created_at.isoformat(),
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
        "limits": msgspec.to_builtins(key.limits),
        "usage": usage or {"requests": 0, "tokens": 0, "cost": format_amount(0)},
    }


def usage_body(row: UsageDay) -> dict[str, Any]:
    return {
        "day": row.day,
        "user_id": row.user_id,
        "key_id": row.key_id,
        "requests": row.requests,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "tokens": row.prompt_tokens + row.completion_tokens,
        "cost": format_amount(row.cost),
    }
