"""The rules of admission every store applies the same way: which entries count, for how long,
and which limit a request's use passes first.

A store decides admission inside its own transaction (:meth:`core.store.Store.admit`); what
it decides is written here once, so that every store answers alike.
"""

from __future__ import annotations

from .errors import RateLimitExceeded
from .records import RateLimits, RateUse

COUNTED_KINDS = ("reservation", "lease", "charge")
"""Ledger kinds that count against a key's (or a keyless user's) rate limits."""

OPEN_KINDS = ("reservation", "lease")
"""Ledger kinds still open: they count as concurrent requests, and belong to the process that
posted them (:mod:`core.cluster`)."""

WINDOW_MS = 60_000
"""The sliding minute of rate limits."""

IN_FLIGHT_MS = 15 * 60_000
"""An open reservation older than this belongs to a crashed process: it no longer counts as
concurrent (a store that knows its owner died settles it sooner)."""

DAY_MS = 24 * 3600_000
"""The window of ``tokens_per_day``."""


def refuse_past(limits: RateLimits, use: RateUse) -> None:
    """Raise :class:`~core.errors.RateLimitExceeded` for the first of ``limits`` that ``use``
    (counting the request being admitted) passes: requests, then tokens, then concurrency."""
    for limit, used, retry in (
        ("requests_per_minute", use.requests, use.requests_reset),
        ("tokens_per_minute", use.tokens, use.tokens_reset),
        ("concurrent_requests", use.concurrent, 1.0),
    ):
        allowed = getattr(limits, limit)
        if allowed is not None and used > allowed:
            raise RateLimitExceeded(limit, allowed, retry, use)
