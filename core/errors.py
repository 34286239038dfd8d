"""Errors raised by chatgate.

Exception tree::

    ChatgateError
    ├── ConfigError            a bad plugins.toml; carries one Problem per line
    ├── PluginError            a plugin failed to import or two claim one name
    ├── InvalidBody            a request body that is not the JSON expected (400)
    ├── Unauthenticated        no API key, or an unknown or revoked one
    ├── InvalidEmail           not an email address
    ├── NotAllowed             an identity outside the allow-list
    ├── UnknownModel           a client asked for a model not in the catalog
    ├── UnknownProvider        a client named a provider instance not configured
    ├── ContextTooLong         the newest input alone exceeds the context budget
    ├── Superseded             a newer question arrived while this one was being prepared
    ├── Conflict               the request does not fit the state it finds (409)
    ├── StoreError
    │   ├── NotFound           the row does not exist (or is not the caller's)
    │   ├── LeaseReleased      charges posted to a lease already released
    │   ├── InsufficientBalance  a charge would take a balance below its floor
    │   ├── BalanceTooLarge    a credit would take a balance past the ceiling
    │   └── RateLimitExceeded  a request would pass its key's rate limits
    └── ProviderError          an upstream failed; ``status`` is the HTTP status to answer
        ├── BadRequest             400: the upstream rejected the request
        ├── AuthenticationFailed   401 upstream: the provider's own key is wrong
        ├── UpstreamBalanceExhausted  402 upstream: the operator's account is empty
        ├── RateLimited            429, retryable, ``retry_after`` seconds when known
        ├── Unavailable            5xx, connection failures, malformed answers; retryable
        │   └── OutOfStanding      503: this process cannot prove to the others it is alive
        └── Timeout                no answer within the configured time; retryable
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from .records import RateUse


class ChatgateError(Exception):
    """Base class of every error chatgate raises on purpose."""


class Problem(msgspec.Struct, frozen=True):
    """One thing wrong with a configuration file, rendered as one line."""

    file: str
    key: str
    expected: str
    found: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} expected {self.expected}, found {self.found}"


class ConfigError(ChatgateError):
    """The configuration is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[Problem], partial: Any = None) -> None:
        self.problems = problems
        self.partial = partial
        """The configuration with defaults where sections were bad, so plugin tables can still be checked."""
        super().__init__("\n".join(str(p) for p in problems))


class PluginError(ChatgateError):
    """A plugin could not be loaded, or two plugins claim the same name."""


class InvalidBody(ChatgateError):
    """A request body that is not the JSON expected: the client's fault, always a 400.

    ``str()`` is a message for the client that names what is wrong; ``field`` is the
    dotted path of the offending field (``limits.requests_per_minute``), or None when
    the body as a whole is to blame. ``reason`` is one of ``empty``, ``syntax``
    (not JSON), ``depth`` (nested deeper than the decoder follows) or ``shape``
    (JSON, but not of the expected type), for surfaces with error codes.
    """

    def __init__(self, message: str, *, reason: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.field = field


class StoreError(ChatgateError):
    """Base class of store failures the caller can act on."""


class NotFound(StoreError):
    """The requested row does not exist."""


class LeaseReleased(StoreError):
    """Charges were posted to a lease that was released (by another process, which took it
    for a dead one's): they must go to the balance on their own."""


class InsufficientBalance(StoreError):
    """A charge would take the balance below the allowed floor."""

    def __init__(self, balance: int, amount: int) -> None:
        from .money import format_amount

        self.balance = balance
        self.amount = amount
        super().__init__(
            f"balance {format_amount(balance)} cannot cover a charge of {format_amount(-amount)} credits"
        )


class BalanceTooLarge(StoreError):
    """A credit would take the balance past :data:`core.money.MAX_BALANCE`; nothing changed."""

    def __init__(self, balance: int, amount: int) -> None:
        from .money import MAX_BALANCE, format_amount

        self.balance = balance
        self.amount = amount
        super().__init__(
            f"balance {format_amount(balance)} plus {format_amount(amount)} credits would pass"
            f" the ceiling of {format_amount(MAX_BALANCE)} credits"
        )


class RateLimitExceeded(StoreError):
    """Admitting a request would pass one of its key's limits.

    ``limit`` names it (``requests_per_minute``, ``tokens_per_minute`` or
    ``concurrent_requests``), ``allowed`` is its value and ``retry_after``
    the seconds until trying again can succeed.
    """

    def __init__(self, limit: str, allowed: int, retry_after: float, use: RateUse) -> None:
        self.limit = limit
        self.allowed = allowed
        self.retry_after = retry_after
        self.use = use
        what = limit.replace("_", " ")
        super().__init__(f"rate limit reached: {allowed} {what} for this key; retry in {retry_after:.1f} s")


class ProviderError(ChatgateError):
    """An upstream failure, typed so surfaces can map it to their own error shapes.

    Attributes:
        status: the HTTP status a surface should answer with.
        code: a short machine-readable code (``rate_limit_exceeded`` ...).
        retryable: whether trying again (later, or elsewhere) may succeed.
        upstream_status: the status the upstream answered, when there was one.
        retry_after: seconds the upstream asked to wait before trying again, when it said.
    """

    status = 502
    code = "upstream_error"
    retryable = False

    def __init__(
        self, message: str, *, upstream_status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.upstream_status = upstream_status
        self.retry_after = retry_after


class BadRequest(ProviderError):
    """The upstream rejected the request as malformed or invalid (400/422)."""

    status = 400
    code = "invalid_request_error"


class AuthenticationFailed(ProviderError):
    """The upstream rejected the provider's credentials; the operator must fix the key."""

    status = 502
    code = "upstream_authentication_failed"


class UpstreamBalanceExhausted(ProviderError):
    """The operator's account at the upstream has no balance left (DeepSeek 402)."""

    status = 502
    code = "upstream_insufficient_balance"


class RateLimited(ProviderError):
    """The upstream is rate limiting; ``retry_after`` is in seconds when it said."""

    status = 429
    code = "rate_limit_exceeded"
    retryable = True

    def __init__(
        self, message: str, *, retry_after: float | None = None, upstream_status: int | None = 429
    ) -> None:
        super().__init__(message, upstream_status=upstream_status, retry_after=retry_after)


class Unavailable(ProviderError):
    """The upstream failed or could not be reached (5xx, connection error, broken stream)."""

    status = 503
    code = "upstream_unavailable"
    retryable = True


class OutOfStanding(Unavailable):
    """This process lost its standing among those sharing the store (:mod:`core.cluster`), so it
    admits nothing (fail closed): another instance will answer. Not the upstream's fault."""

    code = "gateway_unavailable"


class Timeout(ProviderError):
    """The upstream did not answer within the configured time."""

    status = 504
    code = "upstream_timeout"
    retryable = True


PROVIDER_ERRORS: dict[str, type[ProviderError]] = {
    "bad_request": BadRequest,
    "authentication": AuthenticationFailed,
    "insufficient_balance": UpstreamBalanceExhausted,
    "rate_limited": RateLimited,
    "unavailable": Unavailable,
    "timeout": Timeout,
}
"""Provider errors by the short names operators write in configuration."""


class Unauthenticated(ChatgateError):
    """A request carried no API key, or one that is unknown or revoked."""

    def __init__(self, message: str, *, missing: bool) -> None:
        super().__init__(message)
        self.missing = missing


class InvalidEmail(ChatgateError):
    """Something given as an email address is not one."""


class NotAllowed(ChatgateError):
    """The caller's identity is valid but not admitted (an email outside the allow-list)."""


class UnknownModel(ChatgateError):
    """A client asked for a model the catalog does not have."""

    def __init__(self, model: str, known: list[str]) -> None:
        self.model = model
        self.known = known
        super().__init__(f"model {model!r} does not exist; available: {', '.join(known) or 'none'}")


class UnknownProvider(ChatgateError):
    """A client named a provider instance that is not configured."""

    def __init__(self, provider: str, known: list[str]) -> None:
        self.provider = provider
        self.known = known
        super().__init__(f"provider {provider!r} is not configured; configured: {', '.join(known) or 'none'}")


class Conflict(ChatgateError):
    """The request does not fit the state it finds (a reply still generating, nothing to redo)."""


class Superseded(ChatgateError):
    """A newer question for the same conversation arrived while this one was still being
    prepared (its context summarized): its input was stored, no reply was started."""


class ContextTooLong(ChatgateError):
    """The newest input alone does not fit the model's context budget."""

    def __init__(self, tokens: int, budget: int) -> None:
        self.tokens = tokens
        self.budget = budget
        super().__init__(f"the input needs about {tokens} tokens but the model's context budget is {budget}")
