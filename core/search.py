"""The web search interface: results a plugin finds for a query, put into a reply's context."""

from __future__ import annotations

import abc

import msgspec

from .plugin import Plugin


class WebResult(msgspec.Struct, frozen=True):
    """One search result."""

    title: str
    url: str
    snippet: str = ""


class WebSearch(Plugin, abc.ABC):
    """Base class of web search plugins.

    A plugin subclasses this, sets ``name`` and ``Options`` and returns the
    class from the ``register_web_search`` hook; ``[web_search] plugin =
    "<name>"`` in ``plugins.toml`` switches it on (its other keys are the
    options). The topic-chat surface calls :meth:`search` when a client sets
    ``enableGoogleResults``.
    """

    @abc.abstractmethod
    async def search(self, query: str, limit: int) -> list[WebResult]:
        """At most ``limit`` results for ``query``, best first.

        Raise :class:`~core.errors.ProviderError` (or any exception) when the
        search fails: the reply then goes ahead without results and says so.
        """
