"""Shared fixtures for wire-level tests: the real app (lifespan, migrations, loader, engine, SQLite)
driven by httpx over ASGITransport."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from rwkv_gateway.settings import Settings
from support.app import Served, running_app

ServeFactory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(tmp_path: Path, v7_path: Path, app_db_url: str | None) -> AsyncIterator[ServeFactory]:
    """Factory: `await serve(**settings_overrides)` starts an app on the tiny v7 checkpoint and waits
    until its model is loaded. Everything started is shut down when the test ends. The database is a
    SQLite file in each app's data directory, or PostgreSQL in modules that run on both
    (`DB_BACKENDS`)."""
    counter = itertools.count()
    async with contextlib.AsyncExitStack() as stack:

        async def start(**overrides: Any) -> Served:
            overrides.setdefault("db_url", app_db_url)
            settings = Settings(model=v7_path, data_dir=tmp_path / f"data{next(counter)}", **overrides)
            return await stack.enter_async_context(running_app(settings))

        yield start


@pytest.fixture
async def served(serve: ServeFactory) -> Served:
    """The app with default settings."""
    return await serve()
