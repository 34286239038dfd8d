"""``[surfaces.topic_chat]``: the catalog clients pick from, and how replies are made."""

from __future__ import annotations

import msgspec


class CatalogModel(msgspec.Struct, forbid_unknown_fields=True):
    """One model of a series: the ``modelId`` clients send, and the model of ``[models]`` it means."""

    id: int
    model: str
    name: str = ""
    """What pickers show; empty: the model's name."""
    provider: str | None = None
    """A provider instance to use instead of the model's own."""


class Series(msgspec.Struct, forbid_unknown_fields=True):
    """A ``seriesId`` and its models."""

    id: int
    name: str
    models: list[CatalogModel]


def default_series() -> list[Series]:
    """The mock provider's two models, so the default ``plugins.toml`` works as it is."""
    return [Series(1, "Mock", [CatalogModel(1, "mock-chat"), CatalogModel(2, "mock-reasoner")])]


class Options(msgspec.Struct, forbid_unknown_fields=True):
    """``[surfaces.topic_chat]`` options."""

    series: list[Series] = msgspec.field(default_factory=default_series)
    """The catalog clients pick from with ``seriesId`` and ``modelId``."""
    max_message_chars: int = 20_000
    """Longer messages answer 400."""
    system_prompt: str = ""
    """Sent first in every topic; empty: none."""
    summarize: bool = True
    """With ``enableMemory``, fold what no longer fits the context into a rolling summary."""
    web_results: int = 5
    """How many web results go into the context with ``enableGoogleResults``."""
    first_text_wait: float = 10.0
    """Seconds a reply waits for its first text before its headers go out anyway (after that,
    an upstream refusal can only be told in the metadata)."""

    def __post_init__(self) -> None:
        if self.max_message_chars < 1:
            raise ValueError("max_message_chars to be >= 1")
        if not 1 <= self.web_results <= 20:
            raise ValueError("web_results to be between 1 and 20")
