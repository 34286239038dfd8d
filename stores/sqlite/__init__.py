"""The built-in SQLite store (entry point ``sqlite = "stores.sqlite"``).

``store`` is the :class:`SqliteStore` itself; ``worker`` the thread that owns
each of its connections, with group commit; ``schema`` the tables and their
forward migrations; ``accounts``, ``ledger`` and ``conversations`` the calls
that run on that thread; ``rows`` what they share.
"""

from core import Store, hookimpl

from .store import SqliteOptions, SqliteStore

__all__ = ["SqliteOptions", "SqliteStore", "register_stores"]


@hookimpl
def register_stores() -> list[type[Store]]:
    return [SqliteStore]
