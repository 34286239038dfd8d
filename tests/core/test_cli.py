"""The chatgate command, run as a real process."""

from __future__ import annotations

import time

import httpx
import pytest

from core.services.accounts import Accounts
from tests.conftest import chatgate


def test_serve_answers_healthz_and_keys_created_by_the_cli_work(write_config, server_process):
    config = write_config()
    url = server_process(config)
    created = chatgate(
        "keys",
        "create",
        "--email",
        "Ops@Example.com",
        "--name",
        "laptop",
        "--balance",
        "2.5",
        "--config",
        str(config),
        check=True,
    )
    secret = created.stdout.splitlines()[-1]
    assert secret.startswith("sk-cg-")
    assert "ops@example.com" in created.stdout
    assert "2.500000" in created.stdout
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    assert httpx.get(url + "/v1/models", headers={"X-API-Key": secret}).status_code == 200

    listed = chatgate("keys", "list", "--config", str(config), check=True).stdout
    assert secret not in listed
    row = next(line.split() for line in listed.splitlines() if "ops@example.com" in line)
    key_id, prefix = row[0], row[1]
    assert secret.startswith(prefix.removesuffix("..."))
    assert row[-1] == "active"

    revoked = chatgate("keys", "revoke", key_id, "--config", str(config), check=True).stdout
    assert f"refuse it within {Accounts.key_cache_seconds:g} seconds" in revoked
    # The server remembers keys it saw for 2 s; after that the revocation holds.
    deadline = time.monotonic() + 3
    while (status := httpx.get(url + "/v1/models", headers={"X-API-Key": secret}).status_code) == 200:
        assert time.monotonic() < deadline, "a revoked key still works after 3 s"
        time.sleep(0.1)
    assert status == 401
    assert "revoked" in chatgate("keys", "list", "--config", str(config), check=True).stdout


def test_serve_with_two_workers_shares_one_store(write_config, server_process):
    config = write_config()
    url = server_process(config, "--workers", "2")
    secret = chatgate(
        "keys", "create", "--email", "w@example.com", "--config", str(config), check=True
    ).stdout
    headers = {"X-API-Key": secret.splitlines()[-1]}
    statuses = {httpx.get(url + "/v1/models", headers=headers).status_code for _ in range(10)}
    assert statuses == {200}


def test_users_list_and_topup(write_config):
    config = write_config()
    chatgate("keys", "create", "--email", "pay@example.com", "--config", str(config), check=True)
    topped = chatgate("users", "topup", "PAY@example.com", "12.75", "--config", str(config), check=True)
    assert topped.stdout.strip() == "pay@example.com: balance 12.750000"
    taken = chatgate("users", "topup", "pay@example.com", "-0.75", "--config", str(config), check=True)
    assert taken.stdout.strip() == "pay@example.com: balance 12.000000"
    rows = chatgate("users", "list", "--config", str(config), check=True).stdout.splitlines()
    assert rows[0].split() == ["ID", "EMAIL", "BALANCE", "CREATED"]
    assert rows[1].split()[1:3] == ["pay@example.com", "12.000000"]


def test_a_balance_cannot_be_taken_below_zero(write_config):
    config = write_config()
    chatgate("keys", "create", "--email", "poor@example.com", "--config", str(config), check=True)
    result = chatgate("users", "topup", "poor@example.com", "-1", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.strip() == "chatgate: balance 0.000000 cannot cover a charge of 1.000000 credits"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["keys", "create"], "the following arguments are required: --email"),
        (["keys", "create", "--email", "a@b.c", "--balance", "lots"], "'lots' is not a number"),
        (["keys", "revoke", "abc"], "'abc' is not a whole number"),
        (["users", "topup", "a@b.c"], "the following arguments are required: amount"),
        (["serve", "--port", "70000"], "'70000' is not a port"),
        (["keys", "create", "--email", "a@b.c", "--balance", "-5"], "'-5' is negative"),
        (["users", "topup", "a@b.c", "1e20"], "'1e20' is too large"),
        (["users", "topup", "a@b.c", "1000000000000.000001"], "is too large (at most 1,000,000,000,000"),
        (["keys", "create", "--email", "a@b.c", "--balance", "1e999999"], "'1e999999' is too large"),
        (["keys"], "choose an action"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_get_a_usage_line_and_exit_2(write_config, args, message):
    result = chatgate(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("usage: chatgate")
    assert message in result.stderr


def test_a_top_up_past_the_ceiling_is_a_clear_error_and_changes_nothing(write_config):
    config = str(write_config())
    chatgate(
        "keys", "create", "--email", "rich@example.com", "--balance", "1e12", "--config", config, check=True
    )
    more = chatgate("users", "topup", "rich@example.com", "0.000001", "--config", config)
    assert more.returncode == 1
    assert "Traceback" not in more.stderr
    assert more.stderr.startswith("chatgate: balance 1000000000000.000000 plus 0.000001 credits would pass")
    again = chatgate("keys", "create", "--email", "rich@example.com", "--balance", "1", "--config", config)
    assert again.returncode == 1  # and no second key was made for a balance that was refused
    keys = chatgate("keys", "list", "--config", config, check=True).stdout.splitlines()
    assert len(keys) == 2
    rows = chatgate("users", "list", "--config", config, check=True).stdout.splitlines()
    assert rows[1].split()[1:3] == ["rich@example.com", "1000000000000.000000"]


def test_unknown_ids_and_emails_are_clear_errors(write_config):
    config = str(write_config())
    revoke = chatgate("keys", "revoke", "999", "--config", config)
    assert (revoke.returncode, revoke.stderr.strip()) == (1, "chatgate: api key 999 not found")
    topup = chatgate("users", "topup", "ghost@example.com", "1", "--config", config)
    assert topup.returncode == 1
    assert topup.stderr.startswith("chatgate: no user with email ghost@example.com")


def test_a_broken_config_stops_serve_before_it_binds(write_config):
    config = write_config(replace={'host = "127.0.0.1"': 'host = "127.0.0.1"\nprot = 1'})
    result = chatgate("serve", "--config", str(config))
    assert result.returncode == 2
    assert "server.prot: expected one of the keys" in result.stderr
    assert "Traceback" not in result.stderr


def test_not_an_email_is_a_clear_error_and_creates_nothing(write_config):
    config = str(write_config())
    for email in ("", "not an email"):
        result = chatgate("keys", "create", "--email", email, "--config", config)
        assert (result.returncode, result.stderr.strip()) == (
            1,
            f"chatgate: {email!r} is not an email address",
        )
    assert chatgate("users", "list", "--config", config, check=True).stdout.splitlines()[1:] == []


def test_an_unopenable_store_is_a_clear_error(write_config, tmp_path):
    (tmp_path / "file").write_text("")
    config = write_config(replace={'path = "': f'path = "{tmp_path}/file/'})
    result = chatgate("users", "list", "--config", str(config))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"chatgate: cannot open the SQLite database {tmp_path}/file/")


@pytest.mark.parametrize("enabled", [False, True])
def test_the_access_log_is_off_unless_asked(write_config, server_process, tmp_path, enabled):
    config = write_config(replace={"[server]\n": f"[server]\naccess_log = {str(enabled).lower()}\n"})
    url = server_process(config)
    httpx.get(url + "/healthz?probe=access-log", timeout=5)
    server_process.stop(url)
    logged = "\n".join(p.read_text() for p in tmp_path.glob("serve-*.log"))
    assert "ready" in logged  # the server's own log is there either way
    assert ("GET /healthz?probe=access-log" in logged) is enabled
