"""DNS rebinding: a server on loopback answers only Host names that are loopback or allowed."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import chatgate

FOREIGN = "rebound.attacker.example"


def with_server(**settings: str) -> dict[str, str]:
    lines = "".join(f"{key} = {value}\n" for key, value in settings.items())
    return {'host = "127.0.0.1"\n': f'host = "127.0.0.1"\n{lines}'}


async def test_a_foreign_host_is_refused_on_every_route_and_nothing_is_written(gateway):
    headers = {"Host": FOREIGN}
    for response in (
        await gateway.client.get("/healthz", headers=headers),
        await gateway.client.post("/v1/chat/completions", headers=headers, json={"model": "mock-chat"}),
        await gateway.client.post("/api/chat", headers=headers, json={"email": "a@example.com", "inp": "hi"}),
        await gateway.client.post("/api/record", headers=headers, json={"email": "a@example.com"}),
        await gateway.client.get("/chat", headers=headers),
    ):
        assert response.status_code == 400, response.request.url
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert FOREIGN in response.text
        assert "[server] allowed_hosts" in response.text
    assert await gateway.services.accounts.store.list_users() == []


@pytest.mark.parametrize(
    "host",
    ["localhost", "LocalHost:{port}", "127.0.0.1", "127.0.0.1:{port}", "127.3.2.1", "[::1]", "[::1]:{port}"],
)
async def test_loopback_names_are_served(gateway, host):
    port = gateway.url.rsplit(":", 1)[1]
    response = await gateway.client.get("/healthz", headers={"Host": host.format(port=port)})
    assert response.status_code == 200


async def test_allowed_hosts_are_served_whatever_their_case_and_port(write_config, gateway_factory):
    config = write_config(replace=with_server(allowed_hosts='["chat.example.com", "*.corp.example"]'))
    gateway = await gateway_factory(config)
    for host, status in [
        ("chat.example.com", 200),
        ("Chat.Example.COM:8443", 200),
        ("eu.corp.example", 200),
        ("a.b.corp.example:443", 200),
        ("corp.example", 400),  # *.domain is its subdomains
        ("chat.example.com.evil.example", 400),
        ("localhost:8000", 200),  # loopback names stay served
        (FOREIGN, 400),
    ]:
        response = await gateway.client.get("/healthz", headers={"Host": host})
        assert response.status_code == status, host


async def test_off_loopback_any_host_is_served_unless_allowed_hosts_is_set(write_config, gateway_factory):
    # Served on 127.0.0.1 here, but built as `chatgate serve --host 0.0.0.0` builds it.
    open_gateway = await gateway_factory(write_config(name="open.toml"), host="0.0.0.0")
    assert (await open_gateway.client.get("/healthz", headers={"Host": FOREIGN})).status_code == 200

    config = write_config(replace=with_server(allowed_hosts='["chat.example.com"]'), name="listed.toml")
    listed = await gateway_factory(config, host="0.0.0.0")
    assert (await listed.client.get("/healthz", headers={"Host": "chat.example.com"})).status_code == 200
    assert (await listed.client.get("/healthz", headers={"Host": FOREIGN})).status_code == 400


async def test_a_star_turns_the_check_off(write_config, gateway_factory):
    gateway = await gateway_factory(write_config(replace=with_server(allowed_hosts='["*"]')))
    assert (await gateway.client.get("/healthz", headers={"Host": FOREIGN})).status_code == 200


def test_serve_checks_the_address_it_listens_on_even_when_host_overrides_the_config(
    write_config, server_process
):
    # [server] host is not loopback, but --host puts the server on loopback: the check applies.
    config = write_config(replace={'host = "127.0.0.1"\n': 'host = "0.0.0.0"\n'})
    url = server_process(config, "--host", "127.0.0.1")
    assert httpx.get(url + "/healthz", headers={"Host": FOREIGN}, timeout=5).status_code == 400
    assert httpx.get(url + "/healthz", timeout=5).status_code == 200


def test_bad_allowed_hosts_entries_are_configuration_errors(write_config):
    config = write_config(replace=with_server(allowed_hosts='["chat.example.com", "https://x.example/"]'))
    result = chatgate("check", "--config", str(config))
    assert result.returncode == 2
    assert "server: expected allowed_hosts entries to be a host name" in result.stderr
    assert "'https://x.example/'" in result.stderr
