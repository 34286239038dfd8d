"""The plugin host: discovery through entry points, clear failures, registration is not enablement."""

from __future__ import annotations

import textwrap
import types
from pathlib import Path

import pytest

from core.app import create_app
from core.config import load_config
from core.errors import PluginError
from core.hookspecs import hookimpl
from core.plugins import Plugins
from providers.mock import MockProvider
from tests.conftest import chatgate


def plugin(name: str, **hooks: object) -> types.SimpleNamespace:
    """A plugin object implementing ``hooks`` (marked as hookimpls)."""
    return types.SimpleNamespace(__name__=name, **{k: hookimpl(v) for k, v in hooks.items()})


def test_built_in_plugins_come_from_the_entry_point_group():
    plugins = Plugins.load()
    assert plugins.providers["mock"].package == "chatgate"
    assert plugins.providers["mock"].plugin == "mock"
    assert plugins.stores["sqlite"].cls.__module__ == "stores.sqlite.store"
    assert set(plugins.surfaces) >= {"openai_compat", "email_socket", "topic_chat"}


def test_without_installed_plugins_nothing_is_registered():
    plugins = Plugins.load(installed=False)
    assert (plugins.providers, plugins.stores, plugins.surfaces) == ({}, {}, {})


def test_two_plugins_claiming_one_name_fail_naming_both(write_config):
    class Impostor(MockProvider):
        name = "mock"

    impostor = plugin("impostor", register_providers=lambda: [Impostor])
    with pytest.raises(PluginError) as caught:
        create_app(load_config(write_config()), extra_plugins=[impostor])
    message = str(caught.value)
    assert 'provider name "mock" is claimed by two plugins' in message
    assert '"mock" (chatgate)' in message
    assert '"impostor"' in message


def test_registering_something_that_is_not_a_provider_fails_naming_the_plugin():
    with pytest.raises(PluginError, match=r'plugin "sloppy" .* registered .* as a provider'):
        Plugins.load([plugin("sloppy", register_providers=lambda: [object])], installed=False)


def test_a_misspelled_hook_fails_at_start():
    misspelled = types.SimpleNamespace(__name__="typo", register_provider=hookimpl(lambda: []))
    with pytest.raises(PluginError, match="typo"):
        Plugins.load([misspelled], installed=False)


def test_a_hook_that_raises_is_reported_with_its_plugin():
    def boom() -> list[type]:
        raise RuntimeError("kaput")

    with pytest.raises(
        PluginError, match=r'plugin "exploding" failed while registering: RuntimeError: kaput'
    ):
        Plugins.load([plugin("exploding", register_stores=boom)], installed=False)


def test_registered_is_not_enabled(write_config):
    """An installed provider nobody configures is registered but never instantiated."""
    created = []

    class Unused(MockProvider):
        name = "unused"

        def __init__(self, *args: object) -> None:
            created.append(self)
            super().__init__(*args)  # type: ignore[arg-type]

    app = create_app(
        load_config(write_config()), extra_plugins=[plugin("spare", register_providers=lambda: [Unused])]
    )
    assert created == []
    assert "unused" not in app.state.services.catalog.providers


def fake_distribution(site: Path, name: str, entry_point: str, module: str, source: str) -> None:
    """Lay out an installed distribution (metadata, entry point, module) on a PYTHONPATH entry."""
    dist = site / f"{name.replace('-', '_')}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[chatgate]\n{entry_point} = {module}\n")
    (site / f"{module}.py").write_text(source)


def test_a_package_that_fails_to_import_is_one_clear_error(tmp_path: Path, write_config):
    """A broken installed distribution: one line naming the package and the reason, no traceback."""
    site = tmp_path / "site"
    fake_distribution(
        site, "chatgate-broken", "broken", "chatgate_broken", "import no_such_module_anywhere\n"
    )
    result = chatgate("check", "--config", str(write_config()), env={"PYTHONPATH": str(site)})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        'chatgate: plugin "broken" (chatgate_broken) of package chatgate-broken failed to import: '
        "ModuleNotFoundError: No module named 'no_such_module_anywhere'. "
        "Fix it or uninstall it (pip uninstall chatgate-broken)."
    ]


def test_two_packages_with_one_entry_point_name_fail_naming_both(tmp_path: Path, write_config):
    site = tmp_path / "site"
    fake_distribution(site, "chatgate-copycat", "mock", "chatgate_copycat", "")
    result = chatgate("plugins", "--config", str(write_config()), env={"PYTHONPATH": str(site)})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith('chatgate: plugin name "mock" is claimed by two packages: ')
    assert "chatgate-copycat" in line
    assert " chatgate " in line.replace(";", " ").replace(",", " ")


def test_chatgate_plugins_lists_kind_package_and_enablement(write_config):
    config = write_config(replace={"[surfaces.topic_chat]": "[surfaces.topic_chat]\nenabled = false"})
    result = chatgate("plugins", "--config", str(config), check=True)
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["NAME", "KIND", "PACKAGE", "ENABLED"]
    assert ["mock", "provider", "chatgate", "yes"] in rows
    assert ["sqlite", "store", "chatgate", "yes"] in rows
    assert ["openai_compat", "surface", "chatgate", "yes"] in rows
    assert ["topic_chat", "surface", "chatgate", "no"] in rows


def test_hookspecs_are_all_documented():
    from core import hookspecs

    specs = [getattr(hookspecs, n) for n in dir(hookspecs) if n.startswith("register_")]
    assert len(specs) == 4
    for spec in specs:
        doc = textwrap.dedent(spec.__doc__ or "")
        assert "Return" in doc, spec.__name__
        assert "collected" in doc, spec.__name__  # how results of several plugins combine
