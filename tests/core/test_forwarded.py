"""Behind a reverse proxy: whose X-Forwarded-For is believed, and what `chatgate check` warns about."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import chatgate

CLIENT = "203.0.113.9"


def with_server(text: str) -> dict[str, str]:
    return {'host = "127.0.0.1"\n': f'host = "127.0.0.1"\naccess_log = true\n{text}\n'}


def client_seen(write_config, server_process, tmp_path, server_text: str) -> str:
    """The client address the server logs for a request that says it was forwarded for CLIENT."""
    url = server_process(write_config(replace=with_server(server_text)))
    response = httpx.get(url + "/healthz?probe=forwarded", headers={"X-Forwarded-For": CLIENT}, timeout=5)
    assert response.status_code == 200
    server_process.stop(url)
    logged = "\n".join(p.read_text() for p in tmp_path.glob("serve-*.log"))
    line = next(line for line in logged.splitlines() if "probe=forwarded" in line)
    return line.split(" - ", 1)[0].split()[-1]


def test_without_forwarded_allow_ips_no_proxy_is_believed(write_config, server_process, tmp_path):
    # uvicorn by itself believes 127.0.0.1's X-Forwarded-For: a proxy on the same host would
    # then pass whatever address its client claims.
    assert client_seen(write_config, server_process, tmp_path, "").startswith("127.0.0.1:")


@pytest.mark.parametrize("setting", ['["127.0.0.1"]', '"10.0.0.0/8, 127.0.0.0/8"'])
def test_a_listed_proxy_gives_the_client_address(write_config, server_process, tmp_path, setting):
    seen = client_seen(write_config, server_process, tmp_path, f"forwarded_allow_ips = {setting}")
    assert seen.startswith(CLIENT + ":")


def test_a_proxy_not_listed_is_not_believed(write_config, server_process, tmp_path):
    seen = client_seen(write_config, server_process, tmp_path, 'forwarded_allow_ips = ["10.1.2.3"]')
    assert seen.startswith("127.0.0.1:")


def test_forwarded_allow_ips_must_be_addresses_or_networks(write_config):
    config = write_config(replace=with_server('forwarded_allow_ips = ["127.0.0.1", "proxy.internal"]'))
    result = chatgate("check", "--config", str(config))
    assert result.returncode == 2
    assert (
        "server: expected forwarded_allow_ips to be IP addresses or CIDR networks, or * "
        "(found 'proxy.internal'), found values that do not"
    ) in result.stderr


@pytest.mark.parametrize(
    ("host", "email_table", "warned"),
    [
        ("0.0.0.0", "[surfaces.email_socket]", True),
        ("127.0.0.1", "[surfaces.email_socket]", False),
        ("0.0.0.0", '[surfaces.email_socket]\nallow = ["*@example.com"]', False),
        ("0.0.0.0", "[surfaces.email_socket]\nenabled = false", False),
    ],
)
def test_check_warns_when_the_email_surface_would_admit_no_one_remote(
    write_config, host, email_table, warned
):
    config = write_config(
        replace={'host = "127.0.0.1"\n': f'host = "{host}"\n', "[surfaces.email_socket]": email_table}
    )
    result = chatgate("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    if warned:
        assert warnings == [
            "warning: [surfaces.email_socket] allow is unset and [server] host = '0.0.0.0' is not a "
            "loopback address: the email surface admits only loopback callers without proxy headers; "
            "set allow to the addresses it should serve"
        ]
    else:
        assert warnings == []
