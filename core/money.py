"""Amounts of money: integers of micro-credits, read and written as decimal credits."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

MICRO = 1_000_000
"""Micro-credits per credit: balances are integers, so ledgers add up exactly."""
MAX_BALANCE = 10**12 * MICRO
"""The ceiling of every balance and amount, in micro-credits: 10^12 credits.

A top-up past it is refused, so sums of balances and amounts stay far inside a signed
64-bit integer (about 9.2 × 10^18), which every store and JSON codec keeps exactly.
"""


def parse_amount(text: str | float) -> int:
    """Credits as written by a human (``"12.5"``) to micro-credits; at most 6 decimals.

    Raises:
        ValueError: not a finite number with at most 6 decimals, or past :data:`MAX_BALANCE`.
    """
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a number") from None
    if not value.is_finite():
        raise ValueError(f"{text!r} is not a finite number")
    # Compared before any arithmetic: 1e999999 would overflow the decimal context.
    if value.copy_abs() > MAX_BALANCE // MICRO:
        raise ValueError(f"{text!r} is too large (at most {MAX_BALANCE // MICRO:,} credits)")
    micro = value * MICRO
    if micro != micro.to_integral_value():
        raise ValueError(f"{text!r} has more than 6 decimals")
    return int(micro)


def format_amount(micro: int) -> str:
    """Micro-credits as credits with 6 decimals: ``12.500000``."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    return f"{sign}{whole}.{frac:06d}"
