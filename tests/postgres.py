"""The local PostgreSQL server for the tests: a throwaway database per test run, a schema per test.

Tests reach the server named by ``CHATGATE_TEST_POSTGRES`` (an admin DSN; by
default the machine's own cluster as ``postgres`` on 127.0.0.1:5432). Without
one, the tests that need it skip, unless ``CHATGATE_REQUIRE_POSTGRES`` is set
(``.ci/run`` starts the cluster and sets it, so CI never skips).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import secrets
from collections.abc import Iterator

import asyncpg
import pytest

ADMIN_DSN = os.environ.get("CHATGATE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
_schemas = itertools.count(1)


class Database:
    """A database created for this test run; :meth:`schema` gives each test a fresh schema in it."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def schema(self) -> str:
        return f"t{os.getpid()}_{next(_schemas)}"

    def store_section(self, schema: str) -> str:
        """A ``[store]`` section of plugins.toml for this database and ``schema``."""
        return f'[store]\nplugin = "postgres"\ndsn = "{self.dsn}"\nschema = "{schema}"\n'


def _with_database(dsn: str, database: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{database}"


async def _execute(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _admin(sql: str) -> None:
    # On a thread of its own: the fixture may be set up from inside a running event loop.
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, _execute(sql)).result()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Database]:
    """A throwaway database on the local server, dropped at the end of the run."""
    name = f"chatgate_test_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        _admin(f'CREATE DATABASE "{name}"')
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        if os.environ.get("CHATGATE_REQUIRE_POSTGRES"):
            raise RuntimeError(f"PostgreSQL is required at {ADMIN_DSN}: {exc}") from exc
        pytest.skip(f"no PostgreSQL server at {ADMIN_DSN} ({exc})")
    try:
        yield Database(_with_database(ADMIN_DSN, name))
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
