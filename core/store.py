"""The store interface: what a storage backend promises.

:class:`Store` is what every backend writes; :class:`LeaseStore` adds leases, an
optional capability that takes the store off the path of a busy key's requests;
:class:`CopyableStore` another, which lets ``chatgate store copy`` move everything
to a store of another kind. The records it keeps are in :mod:`core.records`.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Any, ClassVar

import msgspec

from .errors import NotFound
from .plugin import Plugin
from .records import (
    ApiKey,
    Conversation,
    ConversationPatch,
    LedgerDraft,
    LedgerEntry,
    LedgerSettlement,
    Message,
    MessageDraft,
    MessagePatch,
    RateLimits,
    RateUse,
    UsageDay,
    User,
)


class Store(Plugin, abc.ABC):
    """Base class of storage backends.

    A store plugin subclasses this, sets ``name`` and ``Options`` and returns
    the class from the ``register_stores`` hook. Every method is safe to call
    concurrently from many tasks (and, for stores that allow it, from many
    processes). Multi-row writes are atomic. Lookups of a missing id raise
    :class:`~core.errors.NotFound`. Every store passes
    :class:`core.testing.store_suite.StoreConformance`; one that also offers
    leases subclasses :class:`LeaseStore` instead.
    """

    # lifecycle: no-ops by default, for a store that holds no connection
    async def open(self) -> None:
        """Connect and bring the schema to the current version (forward migrations)."""

    async def aclose(self) -> None:
        """Release every connection; the store may be opened again afterwards."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise if the backend cannot answer a trivial query."""

    # users
    @abc.abstractmethod
    async def ensure_user(self, email: str) -> User:
        """The user with this email (compared case-insensitively), created with balance 0 if new."""

    @abc.abstractmethod
    async def get_user(self, user_id: int) -> User:
        """The user with this id."""

    @abc.abstractmethod
    async def find_user(self, email: str) -> User | None:
        """The user with this email (case-insensitive), or None."""

    @abc.abstractmethod
    async def list_users(self) -> list[User]:
        """All users, by id."""

    # API keys
    @abc.abstractmethod
    async def create_api_key(self, user_id: int, name: str, prefix: str, key_hash: str) -> ApiKey:
        """Store a new key by its hash."""

    @abc.abstractmethod
    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        """The key with this hash, revoked or not, or None."""

    async def find_api_key_owner(self, key_hash: str) -> tuple[ApiKey, User] | None:
        """The key with this hash and its owner, or None: what authenticating a request needs.

        Override it to answer in one round trip; this default takes two.
        """
        key = await self.find_api_key(key_hash)
        return None if key is None else (key, await self.get_user(key.user_id))

    @abc.abstractmethod
    async def list_api_keys(self, user_id: int | None = None) -> list[ApiKey]:
        """Keys of one user, or of everyone, by id."""

    @abc.abstractmethod
    async def revoke_api_key(self, key_id: int) -> ApiKey:
        """Mark a key revoked (idempotent) and return it."""

    @abc.abstractmethod
    async def set_api_key_limits(self, key_id: int, limits: RateLimits) -> ApiKey:
        """Replace a key's own limits (None fields: use the defaults) and return it."""

    # ledger
    @abc.abstractmethod
    async def post_ledger(self, draft: LedgerDraft, *, floor: int | None = 0) -> LedgerEntry:
        """Add ``draft.amount`` to the user's balance and record the entry, atomically.

        Raises :class:`~core.errors.InsufficientBalance` (and changes nothing)
        when a charge (``amount`` < 0) would end the balance below ``floor``;
        ``floor=None`` allows any balance. Credits (``amount`` >= 0) land
        whatever the floor, so a top-up can repay a balance left negative, but
        raise :class:`~core.errors.BalanceTooLarge` (and change nothing) when
        they would end the balance above :data:`core.money.MAX_BALANCE`,
        checked in the same atomic step, so concurrent top-ups cannot pass it
        together. An amount past ``MAX_BALANCE`` either way is refused the same
        way (a charge as ``InsufficientBalance``). Money that requests in flight
        hold is not counted (counting it would scan the user's ledger inside the
        write): what they give back when they settle lands on top, so a balance
        can pass the ceiling by what was held in flight, itself bounded by the
        balances it was taken from.
        """

    @abc.abstractmethod
    async def admit(
        self, draft: LedgerDraft, limits: RateLimits, *, floor: int = 0, tokens_per_day: int | None = None
    ) -> tuple[LedgerEntry, RateUse]:
        """Post a reservation for ``draft.key_id`` if its key is within ``limits``, atomically.

        In one transaction, across every process sharing the store: counts the
        key's requests and tokens (``prompt_tokens + completion_tokens``) of
        entries created in the last 60 seconds (a store may count whole
        seconds, letting an entry go up to a second early), and its reservations
        not yet settled (created in the last 15 minutes: older ones belong to a
        crashed process). An entry counts as ``requests`` requests (a
        reservation's is 1), and while unsettled as that many concurrent ones.
        Refuses with :class:`~core.errors.RateLimitExceeded` when admitting
        would pass a limit, then with :class:`~core.errors.InsufficientBalance`
        like :meth:`post_ledger`.
        A refusal writes nothing. Returns the entry and the use including it.

        A draft without a key (``key_id`` None: usage no key pays for, the email
        surface's) is counted the same way against the entries of its user that
        have no key (reservations and charges; the minute counted to the
        millisecond). For such a draft ``tokens_per_day`` also applies: it is
        refused (limit ``tokens_per_day``, ``retry_after`` until enough of them
        are a day old) while the tokens of those entries created in the last 24
        hours already reach it, so a day's last request may pass it by its own
        size; a ``tokens_per_day`` for a draft with a key is a ``ValueError``.
        """

    @abc.abstractmethod
    async def settle_ledger(self, entry_id: int, settlement: LedgerSettlement) -> LedgerEntry:
        """Replace a reservation's amount and details, moving the balance by the difference, atomically.

        Settlement never checks a floor: the tokens were already spent. The
        entry's ``balance_after`` becomes the balance right after the
        settlement. Only a reservation settles, once: an entry already settled
        (or of any other kind) is returned as it is, so when two processes
        settle one reservation (its own process, and one that took it for a
        dead one's), the first settlement stands and the balance moves once.
        """

    @abc.abstractmethod
    async def usage_by_day(
        self, since: datetime, *, user_id: int | None = None, key_id: int | None = None
    ) -> list[UsageDay]:
        """Settled charges from ``since`` on, summed per UTC day, user and key, oldest first."""

    @abc.abstractmethod
    async def stale_reservations(self, created_before: datetime) -> list[LedgerEntry]:
        """Reservations created before ``created_before`` that no reply being generated holds,
        oldest first.

        A request without a conversation (the OpenAI-compatible API) settles its
        own reservation, and so does a reply when it ends; one still unsettled long
        after any request could run was left by a process that died (or that died
        while it settled another's), and whoever finds it settles it.
        """

    @abc.abstractmethod
    async def get_ledger_entry(self, entry_id: int) -> LedgerEntry:
        """The ledger entry with this id."""

    @abc.abstractmethod
    async def list_ledger(self, user_id: int, limit: int = 100) -> list[LedgerEntry]:
        """A user's newest ledger entries first."""

    # conversations
    @abc.abstractmethod
    async def create_conversation(
        self, user_id: int, kind: str, name: str = "", series_id: int | None = None
    ) -> Conversation:
        """Start a conversation."""

    @abc.abstractmethod
    async def get_conversation(self, conversation_id: int) -> Conversation:
        """The conversation with this id."""

    @abc.abstractmethod
    async def list_conversations(
        self, user_id: int, kind: str | None = None, series_id: int | None = None
    ) -> list[Conversation]:
        """A user's conversations, optionally of one kind and series, oldest first."""

    @abc.abstractmethod
    async def update_conversation(self, conversation_id: int, patch: ConversationPatch) -> Conversation:
        """Change the set fields and ``updated_at``; return the updated row."""

    @abc.abstractmethod
    async def delete_conversation(self, conversation_id: int) -> Conversation:
        """Delete a conversation and all its messages; return what was deleted."""

    async def delete_stale_conversations(
        self, kind: str, updated_before: datetime, *, empty_only: bool = False
    ) -> int:
        """Delete the conversations of ``kind`` not updated since ``updated_before`` (with
        ``empty_only``, only those without any message), with their messages, as
        :meth:`delete_conversation` does; return how many went.

        This default walks every user's conversations of ``kind`` (correct, not fast);
        stores with a query language should override it with one statement.
        """
        deleted = 0
        for user in await self.list_users():
            for conversation in await self.list_conversations(user.id, kind):
                if conversation.updated_at >= updated_before:
                    continue
                if empty_only and await self.list_messages(conversation.id):
                    continue
                try:
                    await self.delete_conversation(conversation.id)
                except NotFound:  # deleted meanwhile by its owner
                    continue
                deleted += 1
        return deleted

    # messages
    @abc.abstractmethod
    async def append_message(self, conversation_id: int, draft: MessageDraft) -> Message:
        """Append a message and move the conversation's ``updated_at``, atomically."""

    async def append_messages(self, conversation_id: int, drafts: list[MessageDraft]) -> list[Message]:
        """Append several messages in order, all or none (a question and the reply it starts).

        The default appends one by one and is not atomic; stores with
        transactions should override it.
        """
        return [await self.append_message(conversation_id, draft) for draft in drafts]

    @abc.abstractmethod
    async def update_message(self, message_id: int, patch: MessagePatch) -> Message:
        """Change the set fields and ``updated_at``; return the updated row."""

    @abc.abstractmethod
    async def get_message(self, message_id: int) -> Message:
        """The message with this id."""

    @abc.abstractmethod
    async def list_messages(self, conversation_id: int) -> list[Message]:
        """A conversation's messages, oldest first."""

    async def changed_messages(self, conversation_id: int, after_revision: int) -> list[Message]:
        """The conversation's messages added or changed after ``after_revision``, oldest first.

        Messages are never deleted one by one (only with their conversation),
        so these and an earlier list make the current one. Stores that keep a
        per-message revision answer from an index; this default reads them all.
        """
        return [m for m in await self.list_messages(conversation_id) if m.revision > after_revision]

    async def conversation_since(
        self, conversation_id: int, after_revision: int
    ) -> tuple[Conversation, list[Message]]:
        """The conversation, and its messages changed after ``after_revision`` (none when its
        revision has not moved past it), as of one moment.

        A reader that keeps a conversation's messages gets both in one round trip
        where the store can; this default makes two.
        """
        conversation = await self.get_conversation(conversation_id)
        if conversation.revision <= after_revision:
            return conversation, []
        return conversation, await self.changed_messages(conversation_id, after_revision)

    @abc.abstractmethod
    async def interrupt_stale_generations(self, updated_before: datetime) -> list[Message]:
        """Mark ``generating`` messages not updated since ``updated_before`` as ``interrupted``.

        Returns the messages it marked, as they are now, so their reservations
        can be settled. Runs at start-up and periodically, so a crash never
        leaves a reply "generating" forever.
        """


class LeaseStore(Store):
    """A store that also offers leases: one reservation standing for several requests of a key.

    Leases are optional. chatgate admits a key's requests under leases
    (:mod:`core.services.leases`) only when its store subclasses this; with any
    other store each request is admitted by :meth:`Store.admit` alone, with the
    same money and limit guarantees, one store round trip more per request.

    Promises beyond :class:`Store`:

    - :meth:`~Store.admit` also takes a draft of kind ``lease`` for a key: it
      counts as its ``requests`` requests and its ``prompt_tokens`` tokens in
      the minute, and as that many concurrent requests until it is released,
      checked against the limits and the balance floor like a reservation of
      its ``amount``;
    - what an open lease holds and did not spend is still the user's:
      ``User.balance`` adds it back;
    - :meth:`~Store.stale_reservations` lists open leases too (a lease a dead
      process left is released by whoever finds it);
    - the methods below draw on a lease, shrink it and release it.

    Every lease store passes :class:`core.testing.store_suite.LeaseConformance`
    (which includes :class:`~core.testing.store_suite.StoreConformance`).
    """

    @abc.abstractmethod
    async def charge_lease(self, lease_id: int, charges: list[LedgerDraft], counted_tokens: int) -> int:
        """Post ``charges``, requests admitted under lease ``lease_id``, drawing on it, atomically.

        Each charge becomes an entry of its own. The lease holds that much less;
        the balance moves only by what the charges exceed the lease by (the
        tokens were spent: no floor). The key's rate window, which counted
        ``counted_tokens`` for these requests when the lease was posted, counts
        their real tokens instead (the requests themselves were counted then).
        Returns the balance after. Raises :class:`~core.errors.LeaseReleased`
        (and posts nothing) once the lease was released.
        """

    @abc.abstractmethod
    async def shrink_lease(
        self, lease_id: int, requests: int, unused_requests: int, unused_tokens: int, unused_amount: int
    ) -> None:
        """Make an open lease that admits no more stand for the ``requests`` still running, atomically.

        ``unused_amount`` (of what it holds) goes back to the balance, and the requests and
        tokens it counted but never used leave the key's rate window; it keeps counting
        ``requests`` concurrent ones until it is released. A released lease is left as it is.
        """

    @abc.abstractmethod
    async def release_lease(self, lease_id: int, unused_requests: int, unused_tokens: int) -> LedgerEntry:
        """End a lease: what it still holds goes back to the balance, atomically.

        The entry becomes kind (and outcome) ``released`` with amount 0; the requests and
        tokens it counted but never used leave the key's rate window. Releasing
        a released lease changes nothing and returns it; an entry that is no lease
        raises :class:`~core.errors.StoreError`.
        """


COPIED_COLUMNS: dict[str, tuple[str, ...]] = {
    "users": ("id", "email", "balance", "created_at"),
    "api_keys": (
        "id",
        "user_id",
        "name",
        "prefix",
        "key_hash",
        "created_at",
        "revoked_at",
        "requests_per_minute",
        "tokens_per_minute",
        "concurrent_requests",
    ),
    "ledger": (
        "id",
        "user_id",
        "amount",
        "balance_after",
        "kind",
        "key_id",
        "model",
        "provider",
        "prompt_tokens",
        "completion_tokens",
        "latency_ms",
        "outcome",
        "note",
        "created_at",
        "updated_at",
        "requests",
    ),
    "rate_window": ("key_id", "second", "requests", "tokens"),
    "conversations": (
        "id",
        "user_id",
        "kind",
        "name",
        "favorite",
        "series_id",
        "summary",
        "summary_until",
        "created_at",
        "updated_at",
        "revision",
    ),
    "messages": (
        "id",
        "conversation_id",
        "role",
        "content",
        "reasoning",
        "status",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "error",
        "created_at",
        "updated_at",
        "ledger_id",
        "revision",
    ),
}
"""What :class:`CopyableStore` copies: each table's columns, tables in copy order (a row
refers only to rows of tables before its own).

Values are ``int``, ``str`` or None, but for times (every column whose name ends in
``_at``: timezone-aware UTC datetimes, millisecond precision) and ``favorite`` (a
``bool``). ``users.balance`` is the balance as stored, without what open leases hold
(see :class:`LeaseStore`). ``rate_window`` holds each key's requests and tokens per
whole second (Unix time) of its sliding minute. A store may keep more columns than
these (which process owns an entry, say): they are not copied, and loaded rows get
their defaults.
"""


class StoreTotals(msgspec.Struct, frozen=True):
    """What a store holds, in numbers that a faithful copy keeps.

    ``rows``: rows per table of :data:`COPIED_COLUMNS`; ``balances``: the sum of
    ``users.balance`` as stored; ``ledger``: the sum of the ledger's amounts (micro-credits).
    """

    rows: dict[str, int]
    balances: int
    ledger: int


class CopyableStore(Store):
    """A store whose whole content can be copied into another one, ids and all.

    Copying is optional. ``chatgate store copy`` (:func:`core.store_copy.copy_store`)
    moves an operator from one store to another (SQLite to PostgreSQL) when both are
    copyable: it dumps each table of :data:`COPIED_COLUMNS` from one, in order, and
    loads it into the other, which must be empty; API keys, balances, conversations and
    their ids then work unchanged. It is meant for stores nobody serves from while it
    runs.

    Promises beyond :class:`Store`:

    - :meth:`dump` and :meth:`load` carry rows as column -> value dicts with exactly the
      columns :data:`COPIED_COLUMNS` lists, typed as it says, so any two copyable stores
      can exchange them;
    - :meth:`load` stores the rows as they are: the same ids, times, balances and
      revisions (no trigger or default rewrites a copied value);
    - after :meth:`after_load`, rows the store creates take ids above every row loaded,
      and above the ids the source ever gave out (:meth:`last_ids`), so an id a client
      kept from a deleted conversation still never lands on someone else's.
    """

    TABLES: ClassVar[tuple[str, ...]] = tuple(COPIED_COLUMNS)
    """The tables copied, in copy order."""

    @abc.abstractmethod
    def dump(self, table: str) -> AsyncIterator[list[dict[str, Any]]]:
        """Every row of ``table`` (one of :attr:`TABLES`), in batches, ordered by its key
        (``id``; ``rate_window``: ``key_id``, ``second``)."""

    @abc.abstractmethod
    async def load(self, table: str, rows: list[dict[str, Any]]) -> None:
        """Insert ``rows`` (as :meth:`dump` gives them) into ``table`` as they are, in one transaction.

        Rows of the tables before ``table`` that these refer to are loaded already.
        """

    @abc.abstractmethod
    async def is_empty(self) -> bool:
        """Whether no table of :attr:`TABLES` has a row."""

    @abc.abstractmethod
    async def last_ids(self) -> dict[str, int]:
        """For each table of :attr:`TABLES` with an ``id``, the highest id it ever gave a row
        (0: none), counting rows deleted since; at least the highest id it holds."""

    @abc.abstractmethod
    async def after_load(self, last_ids: Mapping[str, int]) -> None:
        """Make rows created from now on take ids above every row loaded and above
        ``last_ids`` (the source's :meth:`last_ids`; a table missing from it: 0)."""

    @abc.abstractmethod
    async def totals(self) -> StoreTotals:
        """Row counts and money sums of what the store holds, as of one moment."""
