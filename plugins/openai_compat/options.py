"""``[surfaces.openai_compat]``: the surface's options, every key's default limits among them."""

from __future__ import annotations

from core import KeyLimits


class Options(KeyLimits, forbid_unknown_fields=True):
    """``[surfaces.openai_compat]`` options.

    ``requests_per_minute``, ``tokens_per_minute`` and ``concurrent_requests``
    (see :class:`~core.services.accounts.KeyLimits`) are every key's default
    limits, on every surface a key is used on.
    """

    owned_by: str = "chatgate"
    """What ``/v1/models`` reports as each model's owner."""
    keepalive_interval: float = 10.0
    """Seconds without a token after which a stream sends an SSE comment, so proxies keep it open."""
    currency: str = "CNY"
    """What ``/user/balance`` names as the currency credits stand for (DeepSeek's shape)."""
    responses_retention_days: float = 30.0
    """Days a stored ``/v1/responses`` response is kept after it was answered (OpenAI keeps them
    30); then it is not found, and a periodic sweep deletes it. 0: kept for ever."""
    store_responses: bool = True
    """Whether ``/v1/responses`` stores responses at all; false: every request is ``store: false``."""

    def __post_init__(self) -> None:
        if self.keepalive_interval <= 0:
            raise ValueError("keepalive_interval to be > 0")
        if self.responses_retention_days < 0:
            raise ValueError("responses_retention_days to be >= 0 (0: kept for ever)")
        super().__post_init__()

    def key_limits(self) -> KeyLimits:
        return KeyLimits(self.requests_per_minute, self.tokens_per_minute, self.concurrent_requests)
