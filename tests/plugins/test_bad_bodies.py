"""Bad JSON is a 400 on every endpoint that takes a body, in each surface's own error shape.

Deeply nested JSON (fifty thousand ``[`` cost a client 100 kB) made msgspec raise
``RecursionError``, which no surface caught: a 500 and a traceback in the log per
request, even unauthenticated. Each case checks the status, the surface's error
shape, that nothing was logged as an error, and that the store is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_HEADERS, WITH_ADMIN, RunningGateway
from tests.plugins.test_topic_chat import User, split, user_on

DEPTH = 50_000
DEEP_ARRAY = b"[" * DEPTH + b"]" * DEPTH
DEEP_OBJECT = b'{"a":' * DEPTH + b"1" + b"}" * DEPTH
DEEP_FIELD = b'{"model": "mock-chat", "email": "a@example.com", "name": "n", "messages": ' + DEEP_ARRAY + b"}"
DEEP = {"deep array": DEEP_ARRAY, "deep object": DEEP_OBJECT, "deep field": DEEP_FIELD}
JSON = {"Content-Type": "application/json"}


class World:
    """A gateway with one key holder, a topic with an exchange in it, and the admin API on."""

    def __init__(
        self, gateway: RunningGateway, user: User, topic: int, message: int, key_id: int, db: Path
    ) -> None:
        self.gateway = gateway
        self.user = user
        self.topic = topic
        self.message = message
        self.key_id = key_id
        self.db = db

    def dump(self) -> list[str]:
        """Everything the store holds, as SQL."""
        with contextlib.closing(sqlite3.connect(self.db)) as db:
            return list(db.iterdump())

    async def settled(self) -> None:
        """Wait until no ledger entry is open: the reply's charge posted, its key's lease released
        (after the lease's idle second), so whatever changes after this is the tests' doing."""
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            with contextlib.closing(sqlite3.connect(self.db)) as db:
                [(open_entries,)] = db.execute(
                    "SELECT COUNT(*) FROM ledger WHERE outcome = 'open'"
                ).fetchall()
            if not open_entries:
                return
            assert asyncio.get_running_loop().time() < deadline, "the ledger did not settle within 30 s"
            await asyncio.sleep(0.05)

    async def post(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return await self.gateway.client.request(method, path, content=body, headers={**JSON, **headers})


@pytest.fixture
async def world(
    write_config: Callable[..., Path], gateway_factory: Callable[..., object], tmp_path: Path
) -> World:
    gateway: RunningGateway = await gateway_factory(write_config(replace=WITH_ADMIN))  # type: ignore[assignment,misc]
    user = await user_on(gateway, "owner@example.com")
    response = await user.call("POST", "/chat/topic", {"name": "t", "seriesId": 1})
    topic = response.json()["id"]
    reply = await user.call(
        "POST", f"/chat/topic/{topic}/message", {"seriesId": 1, "modelId": 2, "message": "Hi"}
    )
    assert reply.status_code == 200, reply.text
    _, meta = split(reply.text)
    [key] = await gateway.services.accounts.list_keys(user.id)
    world = World(gateway, user, topic, meta["userMsgId"], key.id, tmp_path / "chatgate.db")
    await world.settled()
    return world


def openai_shape(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    return str(body["error"]["message"])


def seed_000_shape(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"status", "code", "error"}
    assert (body["status"], body["code"]) == (False, response.status_code)
    return str(body["error"])


def seed_002_shape(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"statusCode", "message"}
    assert body["statusCode"] == response.status_code
    return str(body["message"])


def endpoints(world: World) -> list[tuple[str, str, dict[str, str], Callable[[httpx.Response], str]]]:
    """Every endpoint that takes a body: method, path, credentials, the shape of its errors."""
    key = world.user.headers
    topic, message = world.topic, world.message
    return [
        ("POST", "/v1/chat/completions", key, openai_shape),
        ("POST", "/v1/chat/completions/", key, openai_shape),  # through the router
        ("POST", "/admin/api/users", ADMIN_HEADERS, openai_shape),
        ("POST", f"/admin/api/users/{world.user.id}/topup", ADMIN_HEADERS, openai_shape),
        ("POST", "/admin/api/keys", ADMIN_HEADERS, openai_shape),
        ("PATCH", f"/admin/api/keys/{world.key_id}", ADMIN_HEADERS, openai_shape),
        ("POST", "/api/chat", {}, seed_000_shape),
        ("POST", "/api/record", {}, seed_000_shape),
        ("POST", "/api/clear", {}, seed_000_shape),
        ("POST", "/chat/topic", key, seed_002_shape),
        ("PATCH", f"/chat/topic/{topic}", key, seed_002_shape),
        ("POST", f"/chat/topic/{topic}/message", key, seed_002_shape),
        ("PATCH", f"/chat/topic/{topic}/message/{message}", key, seed_002_shape),
        ("POST", f"/chat/topic/{topic}/message/{message}/regenerate", key, seed_002_shape),
    ]


def assert_nothing_logged_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """A client's bad body is its own fault: no error line, no traceback."""
    assert any(r.name == "httpx" for r in caplog.records), "caplog sees the log (it is not vacuous)"
    noisy = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]


@pytest.mark.parametrize("kind", sorted(DEEP))
async def test_deeply_nested_json_is_a_400_in_each_surfaces_shape_and_changes_nothing(
    world: World, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    before = world.dump()
    caplog.clear()
    for method, path, headers, shape in endpoints(world):
        response = await world.post(method, path, DEEP[kind], headers)
        assert response.status_code == 400, (method, path, response.text)
        message = shape(response)
        # The admin API decodes into its request types: a wrong shape may be found first.
        assert "too deeply" in message or path.startswith("/admin/"), (method, path, message)
    assert_nothing_logged_as_an_error(caplog)
    assert world.dump() == before


async def test_without_credentials_a_deep_body_is_refused_as_unauthenticated(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    before = world.dump()
    caplog.clear()
    for method, path, headers, shape in endpoints(world):
        if not headers:
            continue  # the email surface has no credentials: covered above
        response = await world.post(method, path, DEEP_ARRAY, {})
        assert response.status_code == 401, (method, path, response.text)
        shape(response)
    assert_nothing_logged_as_an_error(caplog)
    assert world.dump() == before


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"{'name': 1}", "not valid JSON"),
        (b"nope", "not valid JSON"),
    ],
)
async def test_an_empty_or_broken_body_is_a_400_everywhere(
    world: World, caplog: pytest.LogCaptureFixture, body: bytes, said: str
) -> None:
    before = world.dump()
    caplog.clear()
    for method, path, headers, shape in endpoints(world):
        response = await world.post(method, path, body, headers)
        assert response.status_code == 400, (method, path, response.text)
        message = shape(response)
        if not path.startswith("/v1/"):  # OpenAI's own wording there: "could not parse the JSON body"
            assert said in message, (method, path, message)
    assert_nothing_logged_as_an_error(caplog)
    assert world.dump() == before


async def test_a_patch_that_changes_nothing_is_a_400_naming_the_fields(world: World) -> None:
    before = world.dump()
    headers = world.user.headers
    for body in (b"{}", b'{"colour": "red"}', b"[]", b"null"):
        response = await world.post("PATCH", f"/chat/topic/{world.topic}", body, headers)
        assert response.status_code == 400, (body, response.text)
        message = seed_002_shape(response)
        assert "'name'" in message or "JSON object" in message, message
    response = await world.post("PATCH", f"/chat/topic/{world.topic}/message/{world.message}", b"{}", headers)
    assert response.status_code == 400
    assert "'message'" in seed_002_shape(response)
    assert world.dump() == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{}", "limits"),
        (b'{"limits": {"requests_per_minute": "ten"}}', "limits.requests_per_minute"),
        (b'{"limits": {"per_fortnight": 1}}', "limits.per_fortnight"),
        (b'{"limits": {}, "colour": "red"}', "colour"),
    ],
)
async def test_an_admin_patch_of_the_wrong_shape_names_the_field(
    world: World, body: bytes, field: str
) -> None:
    before = world.dump()
    response = await world.post("PATCH", f"/admin/api/keys/{world.key_id}", body, ADMIN_HEADERS)
    assert response.status_code == 400, response.text
    assert f"'{field}'" in openai_shape(response)
    assert response.json()["error"]["param"] == field
    assert world.dump() == before


async def test_requests_after_the_bad_ones_are_served_as_before(world: World) -> None:
    for method, path, headers, _ in endpoints(world):
        await world.post(method, path, DEEP_ARRAY, headers)
    response = await world.user.call("GET", f"/chat/topic/{world.topic}/message")
    assert response.json()[0]["message"] == "Hi"
    answer = await world.gateway.client.post("/api/record", json={"email": "a@example.com"})
    assert answer.json() == {"text": [], "code": 200}
    completion: dict[str, Any] = {"model": "mock-chat", "messages": [{"role": "user", "content": "Hi"}]}
    response = await world.gateway.client.post(
        "/v1/chat/completions", json=completion, headers=world.user.headers
    )
    assert response.status_code == 200, response.text
