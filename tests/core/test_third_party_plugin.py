"""A provider shipped as its own pip package is found, configured and used by name."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.types import ChatMessage, ChatRequest
from tests.conftest import ADMIN_HEADERS, WITH_ADMIN, chatgate

EXAMPLE = Path(__file__).parents[2] / "examples" / "chatgate-echo"
PARROT = """
[providers.parrot]
plugin = "echo"
prefix = "you said: "

[models.parrot]
provider = "parrot"
"""


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True, timeout=300, capture_output=True)


@pytest.fixture(scope="module")
def echo_installed() -> Iterator[None]:
    """Install the example package into this environment, and take it out again afterwards."""
    pip("install", "--no-deps", "--no-build-isolation", str(EXAMPLE))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        pip("uninstall", "-y", "chatgate-echo")
        importlib.invalidate_caches()


@pytest.mark.usefixtures("echo_installed")
def test_chatgate_plugins_lists_the_installed_package(write_config):
    rows = [
        line.split()
        for line in chatgate("plugins", "--config", str(write_config(PARROT)), check=True).stdout.splitlines()
    ]
    assert ["echo", "provider", "chatgate-echo", "yes"] in rows


@pytest.mark.usefixtures("echo_installed")
def test_its_options_are_validated_against_its_own_struct(write_config):
    config = write_config(PARROT.replace("\n\n[models", "\nvolume = 11\n\n[models"))
    result = chatgate("check", "--config", str(config))
    assert result.returncode == 2
    assert (
        "providers.parrot.volume: expected one of the keys prefix, delay, found unknown key" in result.stderr
    )


@pytest.mark.usefixtures("echo_installed")
async def test_it_serves_a_model_by_name(write_config, gateway_factory):
    gateway = await gateway_factory(write_config(PARROT, replace=WITH_ADMIN))
    health = (await gateway.client.get("/healthz", headers=ADMIN_HEADERS)).json()
    assert health["providers"]["parrot"] == {"plugin": "echo"}
    services = gateway.services
    user = await services.accounts.user_for_email("fan@example.com", ["*"])
    conversation = await services.conversations.create(user.id, "test")
    request = ChatRequest(model="parrot", messages=(ChatMessage(role="user", content="hello plugin"),))
    route = services.catalog.route("parrot")
    generation = await services.conversations.start_reply(
        conversation, route, request, question="hello plugin"
    )
    outcome = await generation.wait()
    assert outcome.message.content == "you said: hello plugin"
    assert outcome.message.status == "complete"
