"""``[surfaces.anthropic_messages]``: the surface's options."""

from __future__ import annotations

import msgspec


class Options(msgspec.Struct, forbid_unknown_fields=True):
    """``[surfaces.anthropic_messages]`` options.

    A key's rate limits are the same on every surface (``[surfaces.openai_compat]``
    configures their defaults), so there are none here.
    """

    keepalive_interval: float = 10.0
    """Seconds without a token after which a stream sends ``event: ping``, so proxies keep it
    open (the interval the OpenAI surface uses for its comments)."""

    def __post_init__(self) -> None:
        if self.keepalive_interval <= 0:
            raise ValueError("keepalive_interval to be > 0")
