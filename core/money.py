"""Amounts of money: integers of micro-credits, read and written as decimal credits."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

MICRO = 1_000_000
"""Micro-credits per credit: balances are integers, so ledgers add up exactly."""
LIMIT = 2**62
"""The largest amount, in micro-credits, that every store keeps as a 64-bit integer with room to add."""


def parse_amount(text: str | float) -> int:
    """Credits as written by a human (``"12.5"``) to micro-credits; at most 6 decimals.

    Raises:
        ValueError: not a finite number with at most 6 decimals.
    """
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a number") from None
    if not value.is_finite():
        raise ValueError(f"{text!r} is not a finite number")
    micro = value * MICRO
    if micro != micro.to_integral_value():
        raise ValueError(f"{text!r} has more than 6 decimals")
    if abs(micro) > LIMIT:
        raise ValueError(f"{text!r} is too large (at most {LIMIT // MICRO:,} credits)")
    return int(micro)


def format_amount(micro: int) -> str:
    """Micro-credits as credits with 6 decimals: ``12.500000``."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    return f"{sign}{whole}.{frac:06d}"
