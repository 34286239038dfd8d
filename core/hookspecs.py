"""The hooks through which plugins extend chatgate: the reference for plugin authors.

A plugin is a module (or object) with functions marked ``@hookimpl``, found
through the entry-point group ``chatgate``::

    # pyproject.toml of a third-party package
    [project.entry-points.chatgate]
    my_provider = "my_package.plugin"

    # my_package/plugin.py
    from core import Provider, hookimpl

    @hookimpl
    def register_providers():
        return [MyProvider]

The hooks are synchronous and only *register* classes; all runtime work
happens in the classes' async methods. Registration is not enablement:
every installed plugin is registered, ``plugins.toml`` decides which
classes are instantiated and with which options.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .provider import Provider
    from .search import WebSearch
    from .store import Store
    from .surface import Surface

PROJECT = "chatgate"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_providers() -> Sequence[type[Provider]]:
    """Return the provider classes this plugin offers.

    Each class subclasses :class:`core.Provider` and carries a unique
    ``name`` and an ``Options`` struct. Results of all plugins are collected;
    two classes with the same ``name`` fail start-up naming both plugins.
    """


@hookspec
def register_stores() -> Sequence[type[Store]]:
    """Return the store classes this plugin offers.

    Each class subclasses :class:`core.Store` and carries a unique
    ``name`` and an ``Options`` struct. Results of all plugins are collected;
    duplicate names fail start-up naming both plugins.
    """


@hookspec
def register_surfaces() -> Sequence[type[Surface]]:
    """Return the API surface classes this plugin offers.

    Each class subclasses :class:`core.Surface` and carries a unique
    ``name`` and an ``Options`` struct. Results of all plugins are collected;
    duplicate names fail start-up naming both plugins. A surface mounts routes
    only when ``plugins.toml`` enables it.
    """


@hookspec
def register_web_search() -> Sequence[type[WebSearch]]:
    """Return the web search classes this plugin offers.

    Each class subclasses :class:`core.WebSearch` and carries a unique
    ``name`` and an ``Options`` struct. Results of all plugins are collected;
    duplicate names fail start-up naming both plugins. At most one is used: the one a
    ``[web_search]`` table in ``plugins.toml`` names. Without that table the
    topic-chat surface answers ``"webSearch": "unavailable"``.
    """
