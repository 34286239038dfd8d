"""The built-in PostgreSQL store (entry point ``postgres = "stores.postgres"``).

``store`` is the :class:`PostgresStore` itself; ``schema`` its tables and their
forward migrations under an advisory lock; ``ledger`` admission, postings and
leases; ``rows`` what they share.
"""

from core import Store, hookimpl

from .store import PostgresOptions, PostgresStore

__all__ = ["PostgresOptions", "PostgresStore", "register_stores"]


@hookimpl
def register_stores() -> list[type[Store]]:
    return [PostgresStore]
