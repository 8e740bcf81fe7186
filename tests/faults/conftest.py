"""Fault tests (overload, SIGTERM drain, kill -9, disconnect storms, SQLite contention) and the
figures they report.

A test records its figures with the `figure` fixture (`figure("kill -9: 20 kills, 0 lost")`); they
are kept as the test report's user properties, and the session's terminal summary prints every
recorded line, so a plain `pytest -q` run shows what was tried, injected and lost. The hostile-input
and schemathesis tests in tests/api/ record theirs the same way.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from live import AppFactory

from rwkv_gateway.settings import Settings
from support.app import Served, running_app
from support.live import kill_leftovers

FIGURE = "figure"


@pytest.fixture(autouse=True)
def _no_leftover_servers() -> Iterator[None]:
    """A test that fails half-way still leaves no server process running."""
    yield
    kill_leftovers()


@pytest.fixture
def figure(record_property: Callable[[str, object], None]) -> Callable[[str], None]:
    """`figure(line)`: one line for the run's "fault figures" summary (also printed at once)."""

    def record(line: str) -> None:
        print(line)  # noqa: T201  (shown with -s / -rA as well)
        record_property(FIGURE, line)

    return record


@pytest.fixture
async def app_factory(tmp_path: Path, v7_path: Path) -> AsyncIterator[AppFactory]:
    """`await app_factory(**settings)`: an in-process app over ASGITransport, shut down at the end."""
    counter = itertools.count()
    async with contextlib.AsyncExitStack() as stack:

        async def start(**overrides: Any) -> Served:
            settings = Settings(model=v7_path, data_dir=tmp_path / f"data{next(counter)}", **overrides)
            return await stack.enter_async_context(running_app(settings))

        yield start


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines: list[str] = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            for name, value in getattr(report, "user_properties", ()):
                if name == FIGURE:
                    lines.append(f"{report.nodeid.split('::')[-1]}: {value}")
    if lines:
        terminalreporter.write_sep("-", "fault and hostile-input figures")
        for line in sorted(lines):
            terminalreporter.write_line(line)
