"""The PostgreSQL store: the conformance suite with leases, plus what only PostgreSQL has."""

from __future__ import annotations

import asyncio

import pytest

from core import Store
from core.testing.cluster_suite import ClusterConformance, Vanish
from core.testing.store_suite import LeaseConformance, OpenStore
from stores.postgres import PostgresStore, register_stores
from tests.postgres import Database


def postgres_store(database: Database, schema: str, **options: object) -> PostgresStore:
    return PostgresStore("postgres", PostgresStore.Options(dsn=database.dsn, schema=schema, **options))  # type: ignore[arg-type]


class TestPostgresConformance(LeaseConformance):
    @pytest.fixture
    def open_store(self, postgres: Database) -> OpenStore:
        schema = postgres.schema()

        async def open_store() -> Store:
            store = postgres_store(postgres, schema)
            await store.open()
            return store

        return open_store


def test_registers_itself() -> None:
    assert register_stores() == [PostgresStore]
    assert PostgresStore.name == "postgres"


class TestPostgresCluster(ClusterConformance):
    @pytest.fixture
    def open_store(self, postgres: Database) -> OpenStore:
        schema = postgres.schema()

        async def open_store() -> Store:
            store = postgres_store(postgres, schema)
            await store.open()
            return store

        return open_store

    @pytest.fixture
    def vanish(self) -> Vanish:
        async def vanish(store: Store) -> None:
            # As a killed process: its session ends, nothing is written on the way out.
            assert isinstance(store, PostgresStore)
            assert store._membership is not None
            membership, store._membership = store._membership, None
            assert membership._watch is not None
            assert membership._conn is not None
            membership._watch.cancel()
            backend = membership._conn.get_server_pid()
            membership._conn.terminate()
            await gone(store, backend)

        return vanish


async def gone(store: PostgresStore, backend: int) -> None:
    """Wait until the server ended session ``backend`` (it notices a closed socket at once)."""
    async with asyncio.timeout(10):
        while await store._read(  # noqa: ASYNC110 - the server's state, polled: no event to wait on
            lambda conn: conn.fetchval("SELECT 1 FROM pg_stat_activity WHERE pid = $1", backend)
        ):
            await asyncio.sleep(0.01)
