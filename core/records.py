"""The records chatgate keeps: users, API keys, ledger entries, conversations and messages.

These are what a :class:`~core.store.Store` takes and returns, and what services and
surfaces read. Amounts of money are integers in micro-credits (1 credit = 1_000_000),
so a ledger always adds up exactly. Timestamps are timezone-aware UTC datetimes with
millisecond precision.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

import msgspec
from msgspec import UNSET, UnsetType

MessageRole = Literal["user", "assistant", "system"]
MessageStatus = Literal["generating", "complete", "interrupted", "error"]
LedgerKind = Literal["charge", "topup", "reservation", "lease", "released", "adjustment"]
"""``reservation``: one request's worst case, held until it settles into a ``charge``.
``lease``: the worst case of up to ``requests`` requests of one key, held by one
process, which admits them without a store call each; their ``charge`` entries
draw on it, and what is left goes back to the balance when it is ``released``.
A reservation given back unsent and uncounted (one of OpenAI's ``n`` refused together) is
``released`` too: the rate window does not count it."""


def utcnow() -> datetime:
    """Now, in UTC, truncated to milliseconds (what stores keep)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


class User(msgspec.Struct, frozen=True):
    """A person, identified by a lower-cased email address.

    ``balance`` is what the user has not spent: reservations of requests in
    flight are taken from it, leases are not (a request admitted under a
    lease is taken from it once its charge is posted, moments after it ended).
    """

    id: int
    email: str
    balance: int
    created_at: datetime


class RateLimits(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """Limits of one API key over a sliding minute; None means no limit. (A misspelt
    limit in an admin request is refused, not read as "no limit".)

    ``concurrent_requests`` counts requests in flight (reserved, not yet settled).
    """

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None


class ApiKey(msgspec.Struct, frozen=True):
    """An API key. Only its hash is stored; ``prefix`` identifies it to humans.

    ``limits`` are the key's own overrides; unset ones fall back to the defaults
    in ``plugins.toml``.
    """

    id: int
    user_id: int
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None = None
    limits: RateLimits = RateLimits()

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class LedgerDraft(msgspec.Struct, frozen=True):
    """A ledger entry to post. ``amount`` < 0 is a charge, > 0 a top-up."""

    user_id: int
    amount: int
    kind: LedgerKind
    key_id: int | None = None
    model: str | None = None
    provider: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: int | None = None
    outcome: str | None = None
    note: str | None = None
    requests: int = 1


class LedgerSettlement(msgspec.Struct, frozen=True):
    """What a reservation becomes once the real cost is known."""

    amount: int
    kind: LedgerKind = "charge"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: int | None = None
    outcome: str | None = None


class RateUse(msgspec.Struct, frozen=True):
    """A key's use of its limits, counting the request just admitted (or refused).

    ``*_reset`` are seconds until the oldest request (or tokens) of the
    sliding minute leave it.
    """

    requests: int
    tokens: int
    concurrent: int
    requests_reset: float = 0.0
    tokens_reset: float = 0.0


class UsageDay(msgspec.Struct, frozen=True):
    """What one key (or, with ``key_id`` None, direct use) of one user consumed on one UTC day.

    ``cost`` is in micro-credits (positive), from settled charges only.
    """

    day: str
    user_id: int
    key_id: int | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: int


class LedgerEntry(msgspec.Struct, frozen=True):
    """One posted change of a balance; ``balance_after`` is the balance right after it."""

    id: int
    user_id: int
    amount: int
    balance_after: int
    kind: LedgerKind
    key_id: int | None
    model: str | None
    provider: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_ms: int | None
    outcome: str | None
    note: str | None
    created_at: datetime
    updated_at: datetime
    requests: int = 1


class Conversation(msgspec.Struct, frozen=True):
    """A thread of messages owned by one user.

    ``kind`` is the surface's namespace (``email``, ``topic`` ...); ``summary``
    is the rolling summary of messages up to ``summary_until`` (a message id)
    that no longer fit the context budget; ``revision`` versions its messages.
    """

    id: int
    user_id: int
    kind: str
    name: str
    favorite: bool
    series_id: int | None
    summary: str
    summary_until: int | None
    created_at: datetime
    updated_at: datetime
    revision: int = 0
    """Changes whenever one of the conversation's messages is added, changed or removed, by
    any process; equal revisions mean equal messages (so a list of them can be cached)."""


class ConversationPatch(msgspec.Struct, frozen=True):
    """Fields of a conversation to change; UNSET fields stay as they are."""

    name: str | UnsetType = UNSET
    favorite: bool | UnsetType = UNSET
    summary: str | UnsetType = UNSET
    summary_until: int | UnsetType | None = UNSET


class MessageDraft(msgspec.Struct, frozen=True):
    """A message to append to a conversation."""

    role: MessageRole
    content: str = ""
    reasoning: str = ""
    status: MessageStatus = "complete"
    model: str | None = None
    ledger_id: int | None = None
    """The reservation a reply being generated holds, so it can be settled if its process dies."""


class MessagePatch(msgspec.Struct, frozen=True):
    """Fields of a message to change; UNSET fields stay as they are."""

    content: str | UnsetType = UNSET
    reasoning: str | UnsetType = UNSET
    status: MessageStatus | UnsetType = UNSET
    model: str | UnsetType | None = UNSET
    prompt_tokens: int | UnsetType = UNSET
    completion_tokens: int | UnsetType = UNSET
    error: str | UnsetType | None = UNSET
    ledger_id: int | UnsetType | None = UNSET
    """The reservation a reply being (re)generated holds."""


class Message(msgspec.Struct, frozen=True):
    """A stored message. ``error`` says what failed when ``status`` is ``error``."""

    id: int
    conversation_id: int
    role: MessageRole
    content: str
    reasoning: str
    status: MessageStatus
    model: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None
    created_at: datetime
    updated_at: datetime
    ledger_id: int | None = None
    revision: int = 0
    """The conversation's revision this message last changed at (see :attr:`Conversation.revision`)."""
