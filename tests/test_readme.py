"""The README's first screen holds exactly the two set-up commands, and CI runs the test one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    first_screen = "\n".join(text.splitlines()[:40])
    return re.findall(r"```sh\n(.+?)\n```", first_screen)


def test_readme_has_exactly_two_setup_commands() -> None:
    commands = setup_commands()
    assert len(commands) == 2
    serve, test = commands
    assert "rwkv-gateway serve" in serve and "pip install" in serve
    assert "pytest" in test and "pip install" in test


def test_ci_runs_the_readme_test_command() -> None:
    test_command = setup_commands()[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines
