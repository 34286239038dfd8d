"""The admin API (/admin/api/) and /user/balance, over HTTP, with the openai SDK using what it creates."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from core import LedgerDraft
from core.money import MAX_BALANCE, format_amount
from tests.conftest import RunningGateway

TOKEN = "admin-test-token-0123456789"


@pytest.fixture
async def admin(
    write_config: Callable[..., Path], gateway_factory: Callable[..., object]
) -> httpx.AsyncClient:
    config = write_config(replace={'host = "127.0.0.1"\n': f'host = "127.0.0.1"\nadmin_token = "{TOKEN}"\n'})
    gateway: RunningGateway = await gateway_factory(config)  # type: ignore[assignment,misc]
    gateway.client.headers["Authorization"] = f"Bearer {TOKEN}"
    return gateway.client


async def test_admin_routes_are_off_without_a_token(gateway: RunningGateway) -> None:
    response = await gateway.client.get("/admin/api/users", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 404


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}"])
async def test_a_wrong_or_missing_token_is_401(admin: httpx.AsyncClient, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    async with httpx.AsyncClient(base_url=str(admin.base_url)) as anonymous:
        response = await anonymous.get("/admin/api/users", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_admin_token"


async def test_users_keys_limits_usage_and_revocation_end_to_end(admin: httpx.AsyncClient) -> None:
    created = await admin.post("/admin/api/users", json={"email": "Ann@Example.com", "balance": "12.5"})
    assert created.status_code == 201
    user = created.json()
    assert (user["email"], user["balance"]) == ("ann@example.com", "12.500000")
    topped = await admin.post(f"/admin/api/users/{user['id']}/topup", json={"amount": "-2.5"})
    assert topped.json()["balance"] == "10.000000"
    too_much = await admin.post(f"/admin/api/users/{user['id']}/topup", json={"amount": "-100"})
    assert too_much.status_code == 400
    assert too_much.json()["error"]["param"] == "amount"

    made = await admin.post(
        "/admin/api/keys",
        json={"email": "ann@example.com", "name": "laptop", "limits": {"requests_per_minute": 9}},
    )
    assert made.status_code == 201
    key = made.json()
    secret = key.pop("key")
    assert secret.startswith(key["prefix"])
    assert key["limits"] == {"requests_per_minute": 9}
    listed = (await admin.get("/admin/api/keys", params={"prefix": key["prefix"]})).json()["data"]
    assert [k["id"] for k in listed] == [key["id"]]
    assert "key" not in listed[0]
    assert secret not in str(listed)

    async with openai.AsyncOpenAI(
        base_url=str(admin.base_url).rstrip("/") + "/v1", api_key=secret, max_retries=0
    ) as sdk:
        answer = await sdk.chat.completions.create(
            model="mock-chat", messages=[{"role": "user", "content": "Hi"}]
        )
        assert answer.choices[0].message.content
        assert answer.usage is not None
        tokens = answer.usage.total_tokens

        async with httpx.AsyncClient(base_url=str(admin.base_url)) as holder:
            balance = await holder.get("/user/balance", headers={"Authorization": f"Bearer {secret}"})
        info = balance.json()
        assert info["is_available"] is True
        assert info["balance_infos"][0]["currency"] == "CNY"
        assert float(info["balance_infos"][0]["total_balance"]) < 10

        usage = await wait_for_usage(admin, key["id"])
        assert usage["requests"] == 1
        assert usage["tokens"] == tokens
        days = (await admin.get("/admin/api/usage", params={"key_id": key["id"]})).json()["data"]
        assert [(d["key_id"], d["requests"], d["tokens"]) for d in days] == [(key["id"], 1, tokens)]

        limited = await admin.patch(
            f"/admin/api/keys/{key['id']}", json={"limits": {"concurrent_requests": 2}}
        )
        assert limited.json()["limits"] == {"concurrent_requests": 2}
        revoked = await admin.delete(f"/admin/api/keys/{key['id']}")
        assert revoked.json()["active"] is False
        with pytest.raises(openai.AuthenticationError):
            await sdk.chat.completions.create(model="mock-chat", messages=[{"role": "user", "content": "Hi"}])


async def wait_for_usage(admin: httpx.AsyncClient, key_id: int) -> dict[str, Any]:
    for _ in range(100):
        keys = (await admin.get("/admin/api/keys")).json()["data"]
        usage = next(k["usage"] for k in keys if k["id"] == key_id)
        if usage["requests"]:
            return usage  # type: ignore[no-any-return]
        await asyncio.sleep(0.02)
    raise AssertionError("the request was never settled")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/admin/api/users", {"email": "not-an-email"}, "email"),
        ("/admin/api/users", {"email": "a@example.com", "balance": "1.0000001"}, "balance"),
        ("/admin/api/keys", {"name": "no email"}, None),
        ("/admin/api/keys", {"email": "a@example.com", "limits": {"requests_per_minute": "many"}}, None),
    ],
)
async def test_bad_admin_input_is_400(
    admin: httpx.AsyncClient, path: str, body: dict[str, Any], param: str | None
) -> None:
    response = await admin.post(path, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    if param:
        assert error["param"] == param
    assert error["message"]


async def test_unknown_ids_are_404(admin: httpx.AsyncClient) -> None:
    assert (await admin.delete("/admin/api/keys/999")).status_code == 404
    assert (await admin.post("/admin/api/users/999/topup", json={"amount": "1"})).status_code == 404


# --- the ceiling of balances ---

CEILING = format_amount(MAX_BALANCE)  # "1000000000000.000000"


@pytest.fixture
async def admin_gateway(
    write_config: Callable[..., Path], gateway_factory: Callable[..., object]
) -> RunningGateway:
    config = write_config(replace={'host = "127.0.0.1"\n': f'host = "127.0.0.1"\nadmin_token = "{TOKEN}"\n'})
    gateway: RunningGateway = await gateway_factory(config)  # type: ignore[assignment,misc]
    gateway.client.headers["Authorization"] = f"Bearer {TOKEN}"
    return gateway


@pytest.mark.parametrize("balance", ["1000000000000.000001", 10**13, "1e999999", 1e300, "-1"])
async def test_a_user_created_past_the_ceiling_or_below_zero_is_400_and_not_created(
    admin_gateway: RunningGateway, balance: str | float
) -> None:
    admin = admin_gateway.client
    response = await admin.post("/admin/api/users", json={"email": "big@example.com", "balance": balance})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "balance"
    assert await admin_gateway.services.accounts.find_user("big@example.com") is None


async def test_a_top_up_past_the_ceiling_is_400_and_changes_nothing(admin_gateway: RunningGateway) -> None:
    admin = admin_gateway.client
    created = await admin.post("/admin/api/users", json={"email": "rich@example.com", "balance": CEILING})
    assert created.status_code == 201, created.text
    user = created.json()
    assert user["balance"] == CEILING
    ledger = await admin_gateway.services.billing.store.list_ledger(user["id"])
    for amount in ("0.000001", "1000000000000", "1e999999"):
        refused = await admin.post(f"/admin/api/users/{user['id']}/topup", json={"amount": amount})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["param"], error["type"]) == ("amount", "invalid_request_error")
    assert await admin_gateway.services.billing.store.list_ledger(user["id"]) == ledger
    listed = (await admin.get("/admin/api/users")).json()["data"]
    assert [u["balance"] for u in listed if u["id"] == user["id"]] == [CEILING]


async def test_the_admin_api_renders_balances_and_usage_at_the_ceiling(admin_gateway: RunningGateway) -> None:
    admin = admin_gateway.client
    accounts, store = admin_gateway.services.accounts, admin_gateway.services.billing.store
    key, _ = await accounts.create_key("whale@example.com")
    # Ten charges of the largest balance: their sum is past what a 64-bit integer holds.
    for _ in range(10):
        await store.post_ledger(LedgerDraft(user_id=key.user_id, amount=MAX_BALANCE, kind="topup"))
        await store.post_ledger(
            LedgerDraft(user_id=key.user_id, amount=-MAX_BALANCE, kind="charge", key_id=key.id, model="m")
        )
    await store.post_ledger(LedgerDraft(user_id=key.user_id, amount=MAX_BALANCE, kind="topup"))
    spent = format_amount(10 * MAX_BALANCE)
    users = await admin.get("/admin/api/users")
    assert users.status_code == 200, users.text
    assert [u["balance"] for u in users.json()["data"] if u["id"] == key.user_id] == [CEILING]
    keys = await admin.get("/admin/api/keys")
    assert keys.status_code == 200, keys.text
    assert [k["usage"]["cost"] for k in keys.json()["data"] if k["id"] == key.id] == [spent]
    usage = await admin.get("/admin/api/usage", params={"key_id": key.id})
    assert usage.status_code == 200, usage.text
    assert sum(Decimal(row["cost"]) for row in usage.json()["data"]) == Decimal(spent)  # one day or two
