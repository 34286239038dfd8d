"""The admin API under ``/admin/api/``: users, balances, keys, limits and usage.

Mounted only when ``[server] admin_token`` is set (the default configuration
reads it from ``CHATGATE_ADMIN_TOKEN``); every call carries it as
``Authorization: Bearer <token>``. Amounts are decimal credit strings, as
operators write them; errors use the same ``{"error": {...}}`` body as the
OpenAI-compatible API.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from litestar import Request, Router, delete, get, patch, post
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.handlers import BaseRouteHandler
from litestar.response import Response

from core import (
    BalanceTooLarge,
    ChatgateError,
    InsufficientBalance,
    InvalidEmail,
    NotFound,
    Services,
    bearer_matches,
    format_amount,
    web_page,
)

from .admin_wire import (
    KeyRequest,
    LimitsRequest,
    TopUpRequest,
    UserRequest,
    amount,
    decode,
    key_body,
    usage_body,
    user_body,
)
from .answers import error
from .responses import Refused, respond

USAGE_DAYS = 30
STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"admin.css": "text/css; charset=utf-8", "admin.js": "text/javascript; charset=utf-8"}


def admin_page() -> Router:
    """``/admin``: the key-management page, shipped in the package (no CDN: it works offline)."""
    return web_page("/admin", STATIC, "admin.html", PAGE_FILES, "The key-management page")


def admin_router(token: str) -> Router:
    """The admin API, guarded by ``token``."""
    return Router(
        "/admin/api",
        # In this order: Litestar's automatic OPTIONS answer names the methods of a path's first handler.
        route_handlers=[
            list_users,
            create_user,
            top_up,
            list_keys,
            create_key,
            set_limits,
            revoke_key,
            usage,
        ],
        tags=["admin"],
        guards=[AdminToken(token)],
        exception_handlers=dict.fromkeys(STORE_REFUSALS, store_refusal),
    )


class AdminToken:
    """The admin API's guard: ``Authorization: Bearer <token>``, else 401 in OpenAI's shape."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        if connection.scope.get("method") == "OPTIONS":
            return  # Litestar's own answer, the allowed methods, shares the guards: it holds no secret
        if not bearer_matches(connection.headers.get("authorization"), self.token):
            raise Refused(
                401, "Send the admin token as 'Authorization: Bearer <token>'.", "invalid_admin_token"
            )


STORE_REFUSALS: dict[type[ChatgateError], tuple[int, str, str | None]] = {
    NotFound: (404, "not_found", None),
    InvalidEmail: (400, "invalid_value", "email"),
    InsufficientBalance: (400, "insufficient_balance", "amount"),
}
"""What the store refuses: status, code and param of the answer."""


def store_refusal(_: Request[Any, Any, Any], exc: ChatgateError) -> Response[bytes]:
    """A refusal of the store's in OpenAI's shape (see :data:`STORE_REFUSALS`)."""
    status, code, param = next(v for cls, v in STORE_REFUSALS.items() if isinstance(exc, cls))
    return respond(error(status, str(exc), "invalid_request_error", code, param))


@get("/users", summary="List users and balances")
async def list_users(services: NamedDependency[Services]) -> Response[Any]:
    return Response({"data": [user_body(u) for u in await services.accounts.list_users()]})


@post(
    "/users",
    summary="Create a user (or return the existing one), with an opening balance",
    status_code=201,
)
async def create_user(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    accounts = services.accounts
    body = decode(await request.body(), UserRequest)
    opening = amount(body.balance, "balance")
    if opening < 0:  # refused before the user is created: a refusal changes nothing
        raise Refused(400, "Invalid 'balance': an opening balance is >= 0.", "invalid_value", "balance")
    user = await accounts.ensure_user(body.email)
    if opening:
        await credit(services, user.id, opening, "balance", "opening balance")
    return Response(user_body(await accounts.get_user(user.id)), status_code=201)


@post("/users/{user_id:int}/topup", summary="Add credits (negative takes them away, never below zero)")
async def top_up(
    request: Request[Any, Any, Any], services: NamedDependency[Services], user_id: int
) -> Response[Any]:
    body = decode(await request.body(), TopUpRequest)
    await services.accounts.get_user(user_id)
    await credit(services, user_id, amount(body.amount, "amount"), "amount", body.note)
    return Response(user_body(await services.accounts.get_user(user_id)), status_code=200)


@get("/keys", summary="List keys, optionally by prefix or user, with 30 days of usage")
async def list_keys(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    prefix = request.query_params.get("prefix")
    user_id = request.query_params.get("user_id")
    keys = await services.accounts.list_keys(int(user_id) if user_id and user_id.isdigit() else None)
    if prefix:
        keys = [k for k in keys if k.prefix.startswith(prefix) or prefix.startswith(k.prefix)]
    usage = await key_usage(services, datetime.now(UTC) - timedelta(days=USAGE_DAYS))
    names = await emails(services)
    return Response({"data": [key_body(k, names.get(k.user_id), usage.get(k.id)) for k in keys]})


@post("/keys", summary="Create a key; its secret is in this answer only", status_code=201)
async def create_key(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    accounts = services.accounts
    body = decode(await request.body(), KeyRequest)
    key, secret = await accounts.create_key(body.email, body.name)
    if body.limits is not None:
        key = await accounts.set_limits(key.id, body.limits)
    user = await accounts.get_user(key.user_id)
    return Response({**key_body(key, user.email), "key": secret}, status_code=201)


@patch("/keys/{key_id:int}", summary="Set a key's own rate limits (null: the configured default)")
async def set_limits(
    request: Request[Any, Any, Any], services: NamedDependency[Services], key_id: int
) -> Response[Any]:
    accounts = services.accounts
    body = decode(await request.body(), LimitsRequest)
    key = await accounts.set_limits(key_id, body.limits)
    return Response(key_body(key, (await accounts.get_user(key.user_id)).email))


@delete("/keys/{key_id:int}", summary="Revoke a key", status_code=200)
async def revoke_key(services: NamedDependency[Services], key_id: int) -> Response[Any]:
    accounts = services.accounts
    key = await accounts.revoke_key(key_id)
    return Response(key_body(key, (await accounts.get_user(key.user_id)).email))


@get("/usage", summary="Usage by day per key and user")
async def usage(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
    params = request.query_params
    days = params.get("days", str(USAGE_DAYS))
    if not days.isdigit() or not 1 <= int(days) <= 366:
        raise Refused(400, "Invalid 'days': expected an integer from 1 to 366.", "invalid_value", "days")
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
    rows = await services.billing.usage_by_day(since, **filters)
    return Response({"data": [usage_body(r) for r in rows]})


async def credit(services: Services, user_id: int, micro: int, field: str, note: str | None) -> None:
    """Top up, or refuse naming ``field``: past the ceiling, or taking away more than there is."""
    try:
        await services.billing.top_up(user_id, micro, note=note)
    except BalanceTooLarge as exc:
        raise Refused(400, f"Invalid '{field}': {exc}", "invalid_value", field) from None
    except InsufficientBalance as exc:
        raise Refused(400, f"Invalid '{field}': {exc}", "insufficient_balance", field) from None


async def emails(services: Services) -> dict[int, str]:
    return {u.id: u.email for u in await services.accounts.list_users()}


async def key_usage(services: Services, since: datetime) -> dict[int, dict[str, Any]]:
    """Each key's requests, tokens and cost since ``since``."""
    totals: dict[int, dict[str, Any]] = {}
    for row in await services.billing.usage_by_day(since):
        if row.key_id is None:
            continue
        total = totals.setdefault(row.key_id, {"requests": 0, "tokens": 0, "cost": 0})
        total["requests"] += row.requests
        total["tokens"] += row.prompt_tokens + row.completion_tokens
        total["cost"] += row.cost
    return {k: {**v, "cost": format_amount(v["cost"])} for k, v in totals.items()}
