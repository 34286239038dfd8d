"""Discovering plugins and turning ``plugins.toml`` into configured classes.

Everything installed in the entry-point group ``chatgate`` is registered,
built-in plugins included; :meth:`Plugins.configure` then picks what the
configuration names and validates each table against the plugin's
``Options``. The plugin manager is built per call, never at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Generic, Literal, TypeVar

import pluggy

from . import hookspecs
from .config import Config, PluginTable, Report, load_config, sort_problems, validate_options
from .errors import ConfigError, PluginError, Problem
from .provider import Provider
from .search import WebSearch
from .store import Store
from .surface import Surface

Kind = Literal["provider", "store", "surface", "web_search"]
T = TypeVar("T", Provider, Store, Surface, WebSearch)
GROUP = "chatgate"


@dataclass(frozen=True)
class Registered(Generic[T]):
    """A class some plugin registered, and where it came from."""

    cls: type[T]
    plugin: str
    package: str

    @property
    def name(self) -> str:
        return self.cls.name


@dataclass(frozen=True)
class Configured(Generic[T]):
    """A registered class with its validated options, ready to instantiate."""

    key: str
    registered: Registered[T]
    options: Any


@dataclass(frozen=True)
class Setup:
    """What a configuration selects: the store, provider instances, enabled surfaces."""

    store: Configured[Store]
    providers: dict[str, Configured[Provider]]
    surfaces: dict[str, Configured[Surface]]
    disabled_surfaces: tuple[str, ...]
    web_search: Configured[WebSearch] | None = None


class Plugins:
    """The registered providers, stores and surfaces of one plugin manager."""

    def __init__(self, pm: pluggy.PluginManager, packages: dict[str, str]) -> None:
        self.pm = pm
        self.providers = collect(pm, packages, "provider", pm.hook.register_providers, Provider)
        self.stores = collect(pm, packages, "store", pm.hook.register_stores, Store)
        self.surfaces = collect(pm, packages, "surface", pm.hook.register_surfaces, Surface)
        self.web_searches = collect(pm, packages, "web_search", pm.hook.register_web_search, WebSearch)

    @classmethod
    def load(cls, extra: Sequence[object] = (), *, installed: bool = True) -> Plugins:
        """Register every installed plugin (unless ``installed`` is false) plus ``extra`` objects.

        Raises:
            PluginError: a plugin failed to import, registered something
                that is not a plugin class, or two plugins claim one name.
        """
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        packages: dict[str, str] = {}
        if installed:
            for ep in sorted(entry_points(group=GROUP), key=lambda ep: ep.name):
                package = ep.dist.name if ep.dist else "an unknown package"
                try:
                    module = ep.load()
                except Exception as exc:
                    raise PluginError(
                        f'plugin "{ep.name}" ({ep.value}) of package {package} failed to import: '
                        f"{type(exc).__name__}: {exc}. Fix it or uninstall it (pip uninstall {package})."
                    ) from exc
                if pm.is_registered(module):
                    continue  # the same module listed twice, e.g. by an editable and a regular install
                if pm.has_plugin(ep.name):
                    raise PluginError(
                        f'plugin name "{ep.name}" is claimed by two packages: {packages[ep.name]} and '
                        f"{package}; uninstall one of them"
                    )
                pm.register(module, name=ep.name)
                packages[ep.name] = package
        for obj in extra:
            name = getattr(obj, "__name__", None) or type(obj).__name__
            pm.register(obj, name=name)
            packages[name] = getattr(obj, "__package__", None) or "(registered in code)"
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(
                f"plugin {exc.plugin!r} implements a hook chatgate does not have: {exc}"
            ) from exc
        return cls(pm, packages)

    def listing(self) -> list[tuple[Kind, Registered[Any]]]:
        """Every registered class with its kind, sorted by kind and name."""
        rows: list[tuple[Kind, Registered[Any]]] = []
        rows += [("provider", r) for r in self.providers.values()]
        rows += [("store", r) for r in self.stores.values()]
        rows += [("surface", r) for r in self.surfaces.values()]
        rows += [("web_search", r) for r in self.web_searches.values()]
        return sorted(rows, key=lambda row: (row[0], row[1].name))

    def check(self, path: str) -> tuple[Config, Setup]:
        """Load ``path`` and configure it, reporting core and plugin problems together.

        Raises:
            ConfigError: every problem of the file, in line order.
        """
        try:
            config = load_config(path)
        except ConfigError as exc:
            if exc.partial is None:
                raise
            try:
                self.configure(exc.partial)
            except ConfigError as more:
                raise ConfigError(sort_problems(exc.problems + more.problems)) from None
            raise
        return config, self.configure(config)

    def configure(self, config: Config) -> Setup:
        """Match the configuration's tables to registered classes and validate their options.

        Raises:
            ConfigError: listing every unknown plugin name and every bad option.
        """
        problems: list[Problem] = []
        report = Report(config.path, config.text)

        def pick(table: PluginTable, registry: dict[str, Registered[T]], kind: str) -> Configured[T] | None:
            registered = registry.get(table.plugin)
            if registered is None:
                report.add(
                    table.plugin_path,
                    f"one of the installed {kind} plugins ({', '.join(sorted(registry)) or 'none'})",
                    f'"{table.plugin}"',
                )
                return None
            try:
                options = validate_options(config, table, registered.cls.Options)
            except ConfigError as exc:
                problems.extend(exc.problems)
                return None
            return Configured(table.key, registered, options)

        store = pick(config.store, self.stores, "store")
        providers = {name: pick(t, self.providers, "provider") for name, t in config.providers.items()}
        surfaces = {name: pick(t, self.surfaces, "surface") for name, t in config.surfaces.items()}
        web_search = pick(config.web_search, self.web_searches, "web search") if config.web_search else None
        problems.extend(report.problems)
        if problems:
            raise ConfigError(sort_problems(problems))
        assert store is not None
        return Setup(
            store=store,
            providers={n: c for n, c in providers.items() if c is not None},
            surfaces={n: c for n, c in surfaces.items() if c is not None and config.surfaces[n].enabled},
            disabled_surfaces=tuple(n for n, t in config.surfaces.items() if not t.enabled),
            web_search=web_search,
        )


def collect(
    pm: pluggy.PluginManager,
    packages: dict[str, str],
    kind: Kind,
    hook: Any,
    base: type[T],
) -> dict[str, Registered[T]]:
    """Call each implementation of ``hook`` and index its classes by name, refusing duplicates."""
    found: dict[str, Registered[T]] = {}
    for impl in reversed(hook.get_hookimpls()):  # pluggy lists last-registered first
        plugin = impl.plugin_name
        package = packages.get(plugin, "(registered in code)")
        for cls in as_list(impl.function, plugin):
            if not (
                isinstance(cls, type)
                and issubclass(cls, base)
                and isinstance(getattr(cls, "name", None), str)
            ):
                raise PluginError(
                    f'plugin "{plugin}" ({package}) registered {cls!r} as a {kind}, '
                    f"but it is not a {base.__name__} subclass with a string `name`"
                )
            if cls.name in found:
                other = found[cls.name]
                raise PluginError(
                    f'{kind} name "{cls.name}" is claimed by two plugins: "{other.plugin}" ({other.package}) '
                    f'and "{plugin}" ({package}); uninstall one of them'
                )
            found[cls.name] = Registered(cls, plugin, package)
    return found


def as_list(function: Callable[[], Iterable[Any] | None], plugin: str) -> list[Any]:
    try:
        return list(function() or ())
    except Exception as exc:
        raise PluginError(f'plugin "{plugin}" failed while registering: {type(exc).__name__}: {exc}') from exc
