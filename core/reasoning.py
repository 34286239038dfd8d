"""How a request asks its upstream to reason: the chat-completions fields each provider plugin takes.

DeepSeek switches thinking on and off with a ``thinking`` field of its own and takes
``reasoning_effort`` ``high`` or ``max``; other OpenAI-compatible servers take OpenAI's
``reasoning_effort`` and refuse (400) a ``thinking`` they do not know. A surface that turns a
client's reasoning request into chat fields decides here which to send, by the plugin of the
provider instance the request goes to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .fallbacks import Fallbacks

if TYPE_CHECKING:
    from .services.catalog import Route


def upstream_plugin(route: Route) -> str:
    """The plugin (``plugin = "..."``) of the provider instance that answers ``route`` first: the
    instance itself, or the first of its fallback chain (whose dialect the request is written in)."""
    provider = route.provider
    if isinstance(provider, Fallbacks):
        provider = provider.chain[0]
    return provider.name


def reasoning_fields(effort: str | None, plugin: str | None) -> dict[str, Any]:
    """A reasoning ``effort`` (OpenAI's ``none`` ... ``xhigh``, or ``max``) as chat-completions fields
    for an upstream of ``plugin``.

    OpenAI's chat API takes the same values as ``reasoning_effort``. DeepSeek takes ``high``
    and ``max`` (mapping ``low``/``medium`` to ``high`` and ``xhigh`` to ``max`` itself) and
    turns thinking on and off with ``thinking`` instead (wire-formats.md 1.2): ``none`` and
    ``minimal`` ask for (next to) no reasoning, which DeepSeek can only give with thinking
    off; any other effort turns thinking on. A model alias's ``extra_body`` still wins, as the
    operator's definition of the model.
    """
    if effort is None:
        return {}
    if plugin != "deepseek":
        return {"reasoning_effort": effort}
    if effort in ("none", "minimal"):
        return {"thinking": {"type": "disabled"}}
    return {
        "thinking": {"type": "enabled"},
        "reasoning_effort": "max" if effort in ("xhigh", "max") else "high",
    }
