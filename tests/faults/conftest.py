"""Fault tests (overload, SIGTERM drain, kill -9, disconnect storms, SQLite contention) and the
figures they report.

A test records its figures with the `figure` fixture (`figure("kill -9: 20 kills, 0 lost")`); they
are kept as the test report's user properties, and the session's terminal summary prints every
recorded line, so a plain `pytest -q` run shows what was tried, injected and lost. The hostile-input
and schemathesis tests in tests/api/ record theirs the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from live import kill_leftovers

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
