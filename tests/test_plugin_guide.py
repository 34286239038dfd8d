"""docs/plugins.md works as written: its example plugins load, serve and pass their suites.

Every ```python block of the guide whose first line is ``# NAME.py`` is written to a
directory on ``sys.path`` as that module; blocks marked ``(a sketch ...)`` need the reader's
own classes and are only compiled.
"""

from __future__ import annotations

import asyncio
import importlib
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core import WebResult
from core.app import create_app
from core.config import load_config
from core.testing.gateway import RunningGateway
from tests.conftest import settled

GUIDE = Path(__file__).parents[1] / "docs" / "plugins.md"
BLOCK = re.compile(r"```python\n# (\w+)\.py(.*?)\n(.*?)```", re.S)


def guide_modules() -> dict[str, str]:
    """The guide's runnable blocks, by module name; sketches are compiled here, not run."""
    modules = {}
    for name, note, body in BLOCK.findall(GUIDE.read_text()):
        source = f"# {name}.py{note}\n{body}"
        compile(source, f"docs/plugins.md:{name}.py", "exec")  # a sketch must at least be Python
        if "sketch" not in note:
            modules[name] = source
    return modules


MODULES = guide_modules()
_HOME = Path(tempfile.mkdtemp(prefix="chatgate-guide-"))
for _name, _source in MODULES.items():
    (_HOME / f"{_name}.py").write_text(_source)
sys.path.insert(0, str(_HOME))

shout_surface = importlib.import_module("shout_surface")
pages_search = importlib.import_module("pages_search")
# The guide's own conformance test class, collected here as if it were the reader's test file.
TestPagesSearch = importlib.import_module("test_pages_search").TestPagesSearch


def test_the_guide_has_an_example_of_each_kind_that_runs() -> None:
    assert {"shout_surface", "pages_search", "test_pages_search"} <= set(MODULES)
    assert len(BLOCK.findall(GUIDE.read_text())) >= 5  # the provider and store sketches too


def test_every_python_import_in_the_guide_is_of_the_front_door_or_the_toolkit() -> None:
    imports = re.findall(r"^from (core[\w.]*) import", GUIDE.read_text(), re.M)
    assert imports
    assert set(imports) <= {
        "core",
        "core.testing.fake_upstream",
        "core.testing.provider_suite",
        "core.testing.store_suite",
        "core.testing.web_search_suite",
    }


async def test_the_guide_surface_answers_in_its_own_shape_and_bills_the_key(
    write_config: Callable[..., Path], gateway_factory: Callable[..., Any]
) -> None:
    gateway: RunningGateway = await gateway_factory(
        write_config("[surfaces.shout]\n"), extra_plugins=[shout_surface]
    )
    ask = {"model": "mock-chat", "question": "say hello"}

    anonymous = await gateway.client.post("/shout/ask", json=ask)
    assert anonymous.status_code == 401
    assert "problem" in anonymous.json()

    key, secret = await gateway.services.accounts.create_key("shouter@example.com")
    headers = {"Authorization": f"Bearer {secret}"}
    broke = await gateway.client.post("/shout/ask", json=ask, headers=headers)
    assert broke.status_code == 402, broke.text  # mock-chat is priced; the balance is 0

    await gateway.services.billing.top_up(key.user_id, 10_000_000)
    missing = await gateway.client.post("/shout/ask", json={"model": "mock-chat"}, headers=headers)
    assert missing.status_code == 400
    assert "question" in missing.json()["problem"]
    unknown = await gateway.client.post("/shout/ask", json={**ask, "model": "nope"}, headers=headers)
    assert unknown.status_code == 404

    answered = await gateway.client.post("/shout/ask", json=ask, headers=headers)
    assert answered.status_code == 200, answered.text
    answer = answered.json()["answer"]
    assert answer
    assert answer == answer.upper()
    charges = [e for e in await settled(gateway, key.user_id) if e.kind == "charge"]
    assert len(charges) == 1
    assert charges[0].amount < 0
    assert charges[0].key_id == key.id


def test_the_guide_web_search_is_configured_by_its_table(write_config: Callable[..., Path]) -> None:
    table = re.search(r"```toml\n(\[web_search\].*?)```", GUIDE.read_text(), re.S)
    assert table is not None
    app = create_app(load_config(write_config(table.group(1))), extra_plugins=[pages_search])
    search = app.state.services.web_search
    assert isinstance(search, pages_search.PagesSearch)
    found = asyncio.run(search.search("chat gateway", 5))
    assert found == [WebResult("chatgate", "https://example.com/chatgate", "a chat gateway")]


@pytest.fixture(scope="module", autouse=True)
def _forget_guide_modules() -> Any:
    yield
    for name in MODULES:
        sys.modules.pop(name, None)
    sys.path.remove(str(_HOME))
    shutil.rmtree(_HOME, ignore_errors=True)
