"""Users and API keys: the calls that run on the store's thread, each one whole call."""

from __future__ import annotations

import sqlite3
from typing import Any

from core import ApiKey, StoreError, User

from .rows import balance_of, fetch, first, found, insert, now_ms, record


def normal_email(email: str) -> str:
    return email.strip().lower()


USERS = (
    "SELECT id, email, balance - coalesce((SELECT sum(amount) FROM ledger"
    " WHERE ledger.user_id = users.id AND kind = 'lease'), 0) AS balance, created_at FROM users"
)
"""Users as :class:`~core.User`: what open leases hold and did not spend is theirs."""


def user_by_id(db: sqlite3.Connection, user_id: int) -> User:
    return record(User, found(fetch(db, f"{USERS} WHERE id = ?", (user_id,)), "user", user_id))


def ensure_user(db: sqlite3.Connection, email: str) -> User:
    if existing := first(db, User, f"{USERS} WHERE email = ?", (email,)):
        return existing
    db.execute(
        "INSERT INTO users (email, balance, created_at) VALUES (?, 0, ?) ON CONFLICT (email) DO NOTHING",
        (email, now_ms()),
    )
    [row] = fetch(db, f"{USERS} WHERE email = ?", (email,))
    return record(User, row)


def key_by_hash(db: sqlite3.Connection, key_hash: str) -> ApiKey | None:
    return first(db, ApiKey, "SELECT * FROM api_keys WHERE key_hash = ?", (key_hash,))


def key_and_owner(db: sqlite3.Connection, key_hash: str) -> tuple[ApiKey, User] | None:
    key = key_by_hash(db, key_hash)
    return None if key is None else (key, user_by_id(db, key.user_id))


def create_api_key(db: sqlite3.Connection, values: dict[str, Any]) -> ApiKey:
    balance_of(db, values["user_id"])
    if fetch(db, "SELECT 1 FROM api_keys WHERE key_hash = ?", (values["key_hash"],)):
        raise StoreError(f"an api key with this hash already exists (prefix {values['prefix']!r})")
    return record(ApiKey, insert(db, "api_keys", {**values, "created_at": now_ms()}))
