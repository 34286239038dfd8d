"""What the surface answers besides replies: OpenAI's error bodies and rate-limit headers.

An :class:`Answer` is transport-neutral, so the Litestar endpoints and the raw
ASGI chat endpoint answer the same bytes.
"""

from __future__ import annotations

import math

import msgspec

from core import Answer, ProviderError, RateLimited, RateLimitExceeded, RateLimits, RateUse, json_answer

from . import wire

_encode = msgspec.json.Encoder().encode


def error(
    status: int,
    message: str,
    type_: str,
    code: str | None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return json_answer(wire.error_body(message, type_, code, param), status, headers)


def duration(seconds: float) -> str:
    """A reset time the way OpenAI writes it: ``250ms``, ``20s``, ``1m5s``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"


def rate_headers(limits: RateLimits, use: RateUse | None) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for a key's limits and its use of them."""
    headers: dict[str, str] = {}
    if use is None:
        return headers
    for kind, allowed, used, reset in (
        ("requests", limits.requests_per_minute, use.requests, use.requests_reset),
        ("tokens", limits.tokens_per_minute, use.tokens, use.tokens_reset),
    ):
        if allowed is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(allowed)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, allowed - used))
            headers[f"x-ratelimit-reset-{kind}"] = duration(reset)
    return headers


def rate_limited(exc: RateLimitExceeded, limits: RateLimits) -> Answer:
    """429 with ``Retry-After`` (and the millisecond form the openai SDK prefers)."""
    names = {
        "requests_per_minute": ("requests", "requests per minute (RPM)"),
        "tokens_per_minute": ("tokens", "tokens per minute (TPM)"),
        "concurrent_requests": ("requests", "concurrent requests"),
    }
    type_, what = names[exc.limit]
    wait = max(exc.retry_after, 0.001)
    headers = rate_headers(limits, exc.use)
    headers["Retry-After"] = str(max(1, math.ceil(wait)))
    headers["retry-after-ms"] = str(math.ceil(wait * 1000))
    message = (
        f"Rate limit reached for {what} on this API key: limit {exc.allowed}. "
        f"Please try again in {duration(wait)}."
    )
    return error(429, message, type_, "rate_limit_exceeded", headers=headers)


def provider_error(exc: ProviderError) -> Answer:
    """A provider failure before anything was sent, with the status its type stands for."""
    headers = None
    if exc.retry_after is not None:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    type_ = "invalid_request_error" if exc.status == 400 else "upstream_error"
    if isinstance(exc, RateLimited):
        type_ = "rate_limit_error"
    return error(exc.status, exc.message, type_, exc.code, headers=headers)


def stream_error(exc: ProviderError) -> bytes:
    """The SSE event that ends a stream which failed after it began (the SDK raises ``APIError``)."""
    type_ = "rate_limit_error" if isinstance(exc, RateLimited) else "upstream_error"
    return b"data: " + _encode(wire.error_body(exc.message, type_, exc.code)) + b"\n\n"
