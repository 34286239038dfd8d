"""The admin API under ``/admin/api/``: users, balances, keys, limits and usage.

Mounted only when ``[server] admin_token`` is set (the default configuration
reads it from ``CHATGATE_ADMIN_TOKEN``); every call carries it as
``Authorization: Bearer <token>``. Amounts are decimal credit strings, as
operators write them; errors use the same ``{"error": {...}}`` body as the
OpenAI-compatible API.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from litestar import Request, Router, delete, get, patch, post
from litestar.response import Response
from litestar.types import ControllerRouterHandler

from core import (
    ApiKey,
    BalanceTooLarge,
    InsufficientBalance,
    InvalidBody,
    InvalidEmail,
    NotFound,
    RateLimits,
    Services,
    UsageDay,
    User,
    bearer_matches,
    decode_body,
    format_amount,
    parse_amount,
    web_page,
)

from . import wire

USAGE_DAYS = 30


class KeyRequest(msgspec.Struct, forbid_unknown_fields=True):
    email: str
    name: str = ""
    limits: RateLimits | None = None


class UserRequest(msgspec.Struct, forbid_unknown_fields=True):
    email: str
    balance: str | float = "0"


class TopUpRequest(msgspec.Struct, forbid_unknown_fields=True):
    amount: str | float
    note: str | None = None


class LimitsRequest(msgspec.Struct, forbid_unknown_fields=True):
    limits: RateLimits


class Refused(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


def failure(exc: Refused) -> Response[Any]:
    return Response(
        wire.error_body(exc.message, "invalid_request_error", exc.code, exc.param), status_code=exc.status
    )


def decode(raw: bytes, struct: type[Any]) -> Any:
    try:
        return decode_body(raw, struct)
    except InvalidBody as exc:
        code = "invalid_value" if exc.reason == "shape" else "invalid_json"
        raise Refused(400, f"Invalid request: {exc}", code, exc.field) from None


def amount(value: str | float, field: str) -> int:
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


STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"admin.css": "text/css; charset=utf-8", "admin.js": "text/javascript; charset=utf-8"}


def admin_page() -> Router:
    """``/admin``: the key-management page, shipped in the package (no CDN: it works offline)."""
    return web_page("/admin", STATIC, "admin.html", PAGE_FILES, "The key-management page")


def admin_router(services: Services, token: str) -> Router:
    """The admin API, guarded by ``token``."""
    accounts = services.accounts
    billing = services.billing

    def authorized(request: Request[Any, Any, Any]) -> bool:
        return bearer_matches(request.headers.get("authorization"), token)

    async def guarded(request: Request[Any, Any, Any], work: Any) -> Response[Any]:
        if not authorized(request):
            return failure(
                Refused(
                    401, "Send the admin token as 'Authorization: Bearer <token>'.", "invalid_admin_token"
                )
            )
        try:
            return await work()  # type: ignore[no-any-return]
        except Refused as exc:
            return failure(exc)
        except NotFound as exc:
            return failure(Refused(404, str(exc), "not_found"))
        except InvalidEmail as exc:
            return failure(Refused(400, str(exc), "invalid_value", "email"))
        except InsufficientBalance as exc:
            return failure(Refused(400, str(exc), "insufficient_balance", "amount"))

    async def credit(user_id: int, micro: int, field: str, note: str | None) -> None:
        """Top up, or refuse naming ``field``: past the ceiling, or taking away more than there is."""
        try:
            await billing.top_up(user_id, micro, note=note)
        except BalanceTooLarge as exc:
            raise Refused(400, f"Invalid '{field}': {exc}", "invalid_value", field) from None
        except InsufficientBalance as exc:
            raise Refused(400, f"Invalid '{field}': {exc}", "insufficient_balance", field) from None

    async def emails() -> dict[int, str]:
        return {u.id: u.email for u in await accounts.list_users()}

    async def key_usage(since: datetime) -> dict[int, dict[str, Any]]:
        totals: dict[int, dict[str, Any]] = {}
        for row in await billing.usage_by_day(since):
            if row.key_id is None:
                continue
            total = totals.setdefault(row.key_id, {"requests": 0, "tokens": 0, "cost": 0})
            total["requests"] += row.requests
            total["tokens"] += row.prompt_tokens + row.completion_tokens
            total["cost"] += row.cost
        return {k: {**v, "cost": format_amount(v["cost"])} for k, v in totals.items()}

    @get("/users", summary="List users and balances")
    async def list_users(request: Request[Any, Any, Any]) -> Response[Any]:
        async def work() -> Response[Any]:
            return Response({"data": [user_body(u) for u in await accounts.list_users()]})

        return await guarded(request, work)

    @post(
        "/users",
        summary="Create a user (or return the existing one), with an opening balance",
        status_code=201,
    )
    async def create_user(request: Request[Any, Any, Any]) -> Response[Any]:
        async def work() -> Response[Any]:
            body = decode(await request.body(), UserRequest)
            opening = amount(body.balance, "balance")
            if opening < 0:  # refused before the user is created: a refusal changes nothing
                raise Refused(
                    400, "Invalid 'balance': an opening balance is >= 0.", "invalid_value", "balance"
                )
            user = await accounts.ensure_user(body.email)
            if opening:
                await credit(user.id, opening, "balance", "opening balance")
            return Response(user_body(await accounts.get_user(user.id)), status_code=201)

        return await guarded(request, work)

    @post("/users/{user_id:int}/topup", summary="Add credits (negative takes them away, never below zero)")
    async def top_up(request: Request[Any, Any, Any], user_id: int) -> Response[Any]:
        async def work() -> Response[Any]:
            body = decode(await request.body(), TopUpRequest)
            await accounts.get_user(user_id)
            await credit(user_id, amount(body.amount, "amount"), "amount", body.note)
            return Response(user_body(await accounts.get_user(user_id)), status_code=200)

        return await guarded(request, work)

    @get("/keys", summary="List keys, optionally by prefix or user, with 30 days of usage")
    async def list_keys(request: Request[Any, Any, Any]) -> Response[Any]:
        async def work() -> Response[Any]:
            prefix = request.query_params.get("prefix")
            user_id = request.query_params.get("user_id")
            keys = await accounts.list_keys(int(user_id) if user_id and user_id.isdigit() else None)
            if prefix:
                keys = [k for k in keys if k.prefix.startswith(prefix) or prefix.startswith(k.prefix)]
            usage = await key_usage(datetime.now(UTC) - timedelta(days=USAGE_DAYS))
            names = await emails()
            return Response({"data": [key_body(k, names.get(k.user_id), usage.get(k.id)) for k in keys]})

        return await guarded(request, work)

    @post("/keys", summary="Create a key; its secret is in this answer only", status_code=201)
    async def create_key(request: Request[Any, Any, Any]) -> Response[Any]:
        async def work() -> Response[Any]:
            body = decode(await request.body(), KeyRequest)
            key, secret = await accounts.create_key(body.email, body.name)
            if body.limits is not None:
                key = await accounts.set_limits(key.id, body.limits)
            user = await accounts.get_user(key.user_id)
            return Response({**key_body(key, user.email), "key": secret}, status_code=201)

        return await guarded(request, work)

    @patch("/keys/{key_id:int}", summary="Set a key's own rate limits (null: the configured default)")
    async def set_limits(request: Request[Any, Any, Any], key_id: int) -> Response[Any]:
        async def work() -> Response[Any]:
            body = decode(await request.body(), LimitsRequest)
            key = await accounts.set_limits(key_id, body.limits)
            return Response(key_body(key, (await accounts.get_user(key.user_id)).email))

        return await guarded(request, work)

    @delete("/keys/{key_id:int}", summary="Revoke a key", status_code=200)
    async def revoke_key(request: Request[Any, Any, Any], key_id: int) -> Response[Any]:
        async def work() -> Response[Any]:
            key = await accounts.revoke_key(key_id)
            return Response(key_body(key, (await accounts.get_user(key.user_id)).email))

        return await guarded(request, work)

    @get("/usage", summary="Usage by day per key and user")
    async def usage(request: Request[Any, Any, Any]) -> Response[Any]:
        async def work() -> Response[Any]:
            params = request.query_params
            days = params.get("days", str(USAGE_DAYS))
            if not days.isdigit() or not 1 <= int(days) <= 366:
                raise Refused(
                    400, "Invalid 'days': expected an integer from 1 to 366.", "invalid_value", "days"
                )
            filters = {}
            for name in ("user_id", "key_id"):
                value = params.get(name)
                if value is not None:
                    if not value.isdigit():
                        raise Refused(400, f"Invalid '{name}': expected an integer.", "invalid_value", name)
                    filters[name] = int(value)
            since = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(
                days=int(days) - 1
            )
            rows = await billing.usage_by_day(since, **filters)
            return Response({"data": [usage_body(r) for r in rows]})

        return await guarded(request, work)

    handlers: Sequence[ControllerRouterHandler] = [
        list_users,
        create_user,
        top_up,
        list_keys,
        create_key,
        set_limits,
        revoke_key,
        usage,
    ]
    return Router("/admin/api", route_handlers=handlers, tags=["admin"])
