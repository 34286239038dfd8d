"""Who is calling: API keys (stored hashed) and emails checked against an allow-list."""

from __future__ import annotations

import asyncio

import pytest

from core.errors import NotAllowed
from core.services.accounts import KEY_PREFIX, api_key_from, email_allowed, hash_key


async def test_a_created_key_authenticates_its_owner(gateway):
    accounts = gateway.services.accounts
    key, secret = await accounts.create_key("Owner@Example.com", "ci")
    assert secret.startswith(KEY_PREFIX)
    assert secret.startswith(key.prefix)
    assert len(secret) > 40
    caller = await accounts.authenticate(secret)
    assert caller is not None
    assert caller.user.email == "owner@example.com"
    assert caller.key == key


async def test_unknown_malformed_and_revoked_keys_do_not_authenticate(gateway):
    accounts = gateway.services.accounts
    key, secret = await accounts.create_key("owner@example.com")
    assert await accounts.authenticate(secret + "x") is None
    assert await accounts.authenticate("not-a-key") is None
    assert await accounts.authenticate("") is None
    assert await accounts.authenticate(secret) is not None
    await accounts.revoke_key(key.id)
    assert await accounts.authenticate(secret) is None  # at once, though it was remembered


async def test_a_key_changed_by_another_process_takes_effect_within_the_cache_time(gateway):
    accounts = gateway.services.accounts
    accounts.key_cache_seconds = 0.2
    key, secret = await accounts.create_key("owner@example.com")
    assert await accounts.authenticate(secret) is not None
    await accounts.store.revoke_api_key(key.id)  # what `chatgate keys revoke` does, from its own process
    assert await accounts.authenticate(secret) is not None  # remembered ...
    await asyncio.sleep(0.25)
    assert await accounts.authenticate(secret) is None  # ... for key_cache_seconds, no longer


async def test_only_the_hash_of_a_key_is_stored(gateway):
    accounts = gateway.services.accounts
    _, secret = await accounts.create_key("owner@example.com")
    await accounts.store.aclose()  # flush everything to the file
    raw = b"".join(p.read_bytes() for p in accounts.store.path.parent.glob("chatgate.db*") if p.is_file())
    await accounts.store.open()
    assert secret.encode() not in raw
    assert secret[len(KEY_PREFIX) + 6 :].encode() not in raw
    assert hash_key(secret).encode() in raw


@pytest.mark.parametrize(
    ("email", "patterns", "allowed"),
    [
        ("a@example.com", ["*"], True),
        ("A@Example.COM", ["a@example.com"], True),
        ("b@example.com", ["a@example.com"], False),
        ("b@example.com", ["*@example.com"], True),
        ("b@EXAMPLE.com", ["*@Example.com"], True),
        ("b@evil-example.com", ["*@example.com"], False),
        ("b@sub.example.com", ["*@example.com"], False),
        ("b@example.com", [], False),
    ],
)
def test_allow_list_patterns(email, patterns, allowed):
    assert email_allowed(email, patterns) is allowed


async def test_email_users_are_created_on_first_use_only_when_allowed(gateway):
    accounts = gateway.services.accounts
    with pytest.raises(NotAllowed, match=r"stranger@other\.org"):
        await accounts.user_for_email("Stranger@other.org", ["*@example.com"])
    assert await accounts.find_user("stranger@other.org") is None
    first = await accounts.user_for_email("Friend@Example.com", ["*@example.com"])
    again = await accounts.user_for_email("friend@example.com", ["*@example.com"])
    assert first == again
    assert first.email == "friend@example.com"


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"authorization": "Bearer sk-cg-abc"}, "sk-cg-abc"),
        ({"authorization": "bearer   sk-cg-abc "}, "sk-cg-abc"),
        ({"x-api-key": "sk-cg-abc"}, "sk-cg-abc"),
        ({"authorization": "Basic dXNlcg=="}, None),
        ({"authorization": "Bearer "}, None),
        ({}, None),
    ],
)
def test_keys_come_from_bearer_or_x_api_key(headers, key):
    assert api_key_from(headers) == key
