"""Fixtures for the Task API tests: an app that can be stopped and started again on the same data
directory (restart persistence)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from taskhelp import RestartFactory, Served

from rwkv_gateway.settings import Settings
from support.app import running_app


@pytest.fixture
def app_on(v7_path: Path, app_db_url: str | None) -> RestartFactory:
    """`async with app_on(data_dir, **settings) as served:` runs the real app on that data directory
    until the block ends (its lifespan shut down), so a second block is a restart. The database is the
    SQLite file in the data directory, or PostgreSQL in modules that run on both (`DB_BACKENDS`)."""

    @contextlib.asynccontextmanager
    async def run(data_dir: Path, **overrides: Any) -> AsyncIterator[Served]:
        settings = Settings(**{"model": v7_path, "data_dir": data_dir, "db_url": app_db_url, **overrides})
        async with running_app(settings) as served:
            yield served

    return run
