"""Fixtures for the Task API tests: an app that can be stopped and started again on the same data
directory (restart persistence)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from taskhelp import RestartFactory, Served

from rwkv_gateway.app import create_app
from rwkv_gateway.settings import Settings


@pytest.fixture
def app_on(v7_path: Path) -> RestartFactory:
    """`async with app_on(data_dir, **settings) as served:` runs the real app on that data directory
    until the block ends (its lifespan shut down), so a second block is a restart."""

    @contextlib.asynccontextmanager
    async def run(data_dir: Path, **overrides: Any) -> AsyncIterator[Served]:
        settings = Settings(**{"model": v7_path, "data_dir": data_dir, **overrides})
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            await asyncio.wait_for(app.state.services.model.ready.wait(), 60)
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                yield Served(app, client, settings)

    return run
