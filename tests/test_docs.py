"""The README's promises: its test command is what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def readme_block_after(heading: str) -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split(f"## {heading}", 1)[1]
    return re.search(r"```sh\n(.*?)\n```", section, re.S).group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    command = readme_block_after("Run the tests")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == command


def test_readme_install_command_installs_dev_extras_and_serves():
    command = readme_block_after("Install and run")
    assert "pip install -e '.[dev]'" in command
    assert command.endswith("chatgate serve")


def test_ci_runs_the_example_plugins_test_command_before_the_suite():
    readme = (ROOT / "examples" / "chatgate-echo" / "README.md").read_text()
    command = re.search(r"## Test it.*?```sh\n(.*?)\n```", readme, re.S).group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    [line] = [n for n, text in enumerate(ci) if text.startswith(command)]
    assert ci[line] in (command, command + " || exit")  # set -e needs the `|| exit` after a && list
    assert line < len(ci) - 1
