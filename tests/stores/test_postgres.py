"""The PostgreSQL store: the conformance suite with leases, plus what only PostgreSQL has."""

from __future__ import annotations

import pytest

from core import Store
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
