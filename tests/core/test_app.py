"""The app factory: enabled surfaces only, health, schema, lifespan-managed resources."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from litestar import MediaType, get

from core import __version__
from core.app import app_from_environment, create_app, tune_server_process
from core.config import load_config
from core.errors import StoreError
from core.hookspecs import hookimpl
from core.surface import Surface
from providers.mock import MockProvider
from tests.conftest import ADMIN_HEADERS, ADMIN_TOKEN, WITH_ADMIN, serving

SURFACE_ROUTES = {
    "openai_compat": ("GET", "/v1/models", None),
    "email_socket": ("POST", "/api/record", {"email": "someone@example.com"}),
    "topic_chat": ("GET", "/chat/topic", None),
}


async def status_of(client: httpx.AsyncClient, surface: str, key: str) -> int:
    method, path, body = SURFACE_ROUTES[surface]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = await client.request(method, path, json=body, headers=headers)
    return response.status_code


async def new_key(gateway) -> str:
    _, secret = await gateway.services.accounts.create_key("owner@example.com")
    return secret


@pytest.mark.parametrize("disabled", sorted(SURFACE_ROUTES))
async def test_a_disabled_surface_answers_404_while_the_others_work(disabled, write_config, gateway_factory):
    config = write_config(replace={f"[surfaces.{disabled}]": f"[surfaces.{disabled}]\nenabled = false"})
    gateway = await gateway_factory(config)
    key = await new_key(gateway)
    for surface in SURFACE_ROUTES:
        expected = 404 if surface == disabled else 200
        assert await status_of(gateway.client, surface, key) == expected, surface


async def test_a_surface_without_a_table_is_not_mounted(write_config, gateway_factory):
    config = write_config(replace={"[surfaces.email_socket]\n": "", **WITH_ADMIN})
    gateway = await gateway_factory(config)
    assert await status_of(gateway.client, "email_socket", "") == 404
    health = (await gateway.client.get("/healthz", headers=ADMIN_HEADERS)).json()
    assert health["surfaces"] == ["openai_compat", "topic_chat"]


async def test_healthz_reports_store_providers_and_surfaces_without_secrets(
    write_config, gateway_factory, monkeypatch
):
    config = write_config(
        replace={"\ntoken_delay = 0": '\ntoken_delay = 0\nfail_message = "${SECRET_FOR_TEST}"', **WITH_ADMIN}
    )
    monkeypatch.setenv("SECRET_FOR_TEST", "sk-very-secret-value")
    gateway = await gateway_factory(config)
    response = await gateway.client.get("/healthz", headers=ADMIN_HEADERS)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    # Exactly these fields: no options (where secrets live), no filesystem paths.
    # ... and which of the processes sharing the store answered (core.cluster).
    assert body["store"] == {
        "plugin": "sqlite",
        "ok": True,
        "instance": gateway.services.generations.instance,
    }
    assert isinstance(body["store"]["instance"], str)
    assert body["providers"] == {"mock": {"plugin": "mock", "models": ["mock-chat", "mock-reasoner"]}}
    assert body["surfaces"] == ["openai_compat", "email_socket", "topic_chat"]
    assert "sk-very-secret-value" not in response.text
    assert str(gateway.services.config.path.rsplit("/", 1)[0]) not in response.text


async def test_healthz_tells_anyone_the_status_and_only_the_admin_token_the_details(
    write_config, gateway_factory
):
    gateway = await gateway_factory(write_config(replace=WITH_ADMIN))
    anonymous = {"status": "ok", "version": __version__}
    assert (await gateway.client.get("/healthz")).json() == anonymous
    for wrong in (f"Bearer {ADMIN_TOKEN}x", f"Basic {ADMIN_TOKEN}", ADMIN_TOKEN, "Bearer x"):
        response = await gateway.client.get("/healthz", headers={"Authorization": wrong})
        assert (response.status_code, response.json()) == (200, anonymous), wrong
    details = (await gateway.client.get("/healthz", headers=ADMIN_HEADERS)).json()
    assert set(details) == {"status", "version", "store", "providers", "surfaces"}
    # Without an admin token configured, no header shows them.
    plain = await gateway_factory(write_config(name="plain.toml"))
    assert (await plain.client.get("/healthz", headers=ADMIN_HEADERS)).json() == anonymous


async def test_healthz_answers_503_when_the_store_is_unreachable(write_config, gateway_factory):
    gateway = await gateway_factory(write_config(replace=WITH_ADMIN))
    await gateway.services.accounts.store.aclose()
    response = await gateway.client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "version": __version__}
    response = await gateway.client.get("/healthz", headers=ADMIN_HEADERS)
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert response.json()["store"]["ok"] is False
    assert response.json()["store"]["error"].endswith("; see the server log")
    await gateway.services.accounts.store.open()  # so shutdown closes a store that is open


async def test_a_direct_route_is_answered_before_the_router_which_keeps_the_rest(
    write_config, gateway_factory
):
    """What Surface.direct_routes promises a surface's author: the exact path skips routing."""

    async def direct(scope, receive, send) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"direct"})

    class Echo(Surface):
        name = "echo"

        def route_handlers(self, services):
            @get("/echo", media_type=MediaType.TEXT)
            async def routed() -> str:
                return "router"

            return [routed]

        def direct_routes(self, services):
            return {"/echo": direct}

    echo = types.SimpleNamespace(__name__="direct_echo", register_surfaces=hookimpl(lambda: [Echo]))
    gateway = await gateway_factory(
        write_config("[surfaces.echo]\n", replace=WITH_ADMIN), extra_plugins=[echo]
    )
    assert (await gateway.client.get("/echo")).text == "direct"
    assert (await gateway.client.post("/echo")).text == "direct"  # every method: the app answers them
    assert (await gateway.client.get("/echo/")).text == "router"  # not the exact path: routed
    assert (await gateway.client.get("/healthz", headers=ADMIN_HEADERS)).json()["surfaces"][-1] == "echo"


async def test_openapi_schema_lists_the_mounted_routes(gateway):
    response = await gateway.client.get("/schema/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert {"/healthz", "/v1/models", "/api/record", "/chat/topic"} <= set(paths)
    # The dialects' hot paths are raw ASGI apps answered before the router (core.documented_route
    # lists them); their operations say what they take.
    assert {"/v1/chat/completions", "/v1/responses", "/v1/embeddings"} <= set(paths)
    chat = paths["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["required"] == ["model", "messages"]


async def test_the_schema_is_served_as_json_and_no_page_loads_a_cdn_script(gateway):
    """Litestar's documentation pages (Scalar, Swagger, Redoc...) load scripts from CDNs: not served."""
    schema = await gateway.client.get("/schema")
    assert schema.status_code == 200
    assert schema.headers["content-type"].startswith("application/vnd.oai.openapi+json")
    assert schema.json()["paths"] == (await gateway.client.get("/schema/openapi.json")).json()["paths"]
    for page in ("swagger", "redoc", "elements", "rapidoc", "scalar", "openapi.yaml"):
        assert (await gateway.client.get(f"/schema/{page}")).status_code == 404, page


async def test_bodies_over_the_configured_limit_answer_413(write_config, gateway_factory):
    gateway = await gateway_factory(
        write_config(replace={'host = "127.0.0.1"': 'host = "127.0.0.1"\nmax_body_bytes = 100'})
    )
    response = await gateway.client.post("/api/record", json={"email": "a@example.com", "pad": "x" * 200})
    assert response.status_code == 413


async def test_providers_and_store_are_opened_and_closed_by_the_lifespan(write_config):
    """The lifespan opens what the configuration selects and closes it at shutdown."""
    events: list[str] = []

    class Tracked(MockProvider):
        name = "tracked"

        async def open(self) -> None:
            events.append(f"open {self.instance}")

        async def aclose(self) -> None:
            events.append(f"close {self.instance}")

    tracking = types.SimpleNamespace(__name__="tracking", register_providers=hookimpl(lambda: [Tracked]))
    config = load_config(
        write_config('[providers.one]\nplugin = "tracked"\n[providers.two]\nplugin = "tracked"\n')
    )
    app = create_app(config, extra_plugins=[tracking])
    assert events == []
    async with serving(app) as url, httpx.AsyncClient() as client:
        assert events == ["open one", "open two"]
        assert (await client.get(url + "/healthz")).status_code == 200
    assert events == ["open one", "open two", "close two", "close one"]
    with pytest.raises(StoreError):  # the store's connection is gone too
        await app.state.services.conversations.store.ping()


async def test_only_chatgate_serve_tunes_the_process(
    write_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app embedded in another process (here, the test runner) leaves its GIL switch interval
    and garbage collector alone; the app `chatgate serve` runs in each worker tunes them once started."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.004)  # not Python's default, nor what serve sets
    try:
        app = create_app(load_config(write_config()))
        async with serving(app):
            assert sys.getswitchinterval() == 0.004
    finally:
        sys.setswitchinterval(interval)
    assert tune_server_process not in app.on_startup
    monkeypatch.setenv("CHATGATE_CONFIG", str(write_config()))
    assert tune_server_process in app_from_environment().on_startup
