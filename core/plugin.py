"""The shape every plugin shares: a name, an ``Options`` struct, ``open()`` and ``aclose()``."""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec


class NoOptions(msgspec.Struct, forbid_unknown_fields=True):
    """Options of a plugin that takes none."""


class Plugin:
    """Base of every plugin kind: :class:`~core.Provider`, :class:`~core.Store`,
    :class:`~core.Surface` and :class:`~core.WebSearch`.

    A plugin class sets ``name`` (what ``plugin = "..."`` or ``[surfaces.<name>]``
    names in plugins.toml) and ``Options`` (a ``msgspec.Struct`` its table is
    validated against; unknown keys fail start-up naming the key). chatgate
    creates each configured instance as ``cls(instance, options)``, where
    ``instance`` is the name the operator gave it (a provider's or a surface's
    table name; the plugin's ``name`` for the store and web search), calls
    :meth:`open` once before it is used and :meth:`aclose` once at shutdown, in
    reverse order of opening.
    """

    name: ClassVar[str]
    Options: ClassVar[type[msgspec.Struct]] = NoOptions

    def __init__(self, instance: str, options: Any) -> None:
        self.instance = instance
        self.options = options

    async def open(self) -> None:
        """Acquire resources (connection pools, files); called once before first use."""

    async def aclose(self) -> None:
        """Release every resource :meth:`open` acquired; called once at shutdown."""

    def describe(self) -> dict[str, Any]:
        """What ``/healthz`` shows the operator about this instance. Never include secrets."""
        return {"plugin": self.name}
