"""Shared fixtures for wire-level tests: the real app (lifespan, migrations, loader, engine, SQLite)
driven by httpx over ASGITransport."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from rwkv_gateway.app import create_app
from rwkv_gateway.settings import Settings


@dataclass(slots=True)
class Served:
    """A started app and a client bound to it."""

    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings

    @property
    def model(self) -> str:
        return str(self.app.state.services.model.engine.info.name)


ServeFactory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(tmp_path: Path, v7_path: Path) -> AsyncIterator[ServeFactory]:
    """Factory: `await serve(**settings_overrides)` starts an app on the tiny v7 checkpoint and waits
    until its model is loaded. Everything started is shut down when the test ends."""
    counter = itertools.count()
    async with contextlib.AsyncExitStack() as stack:

        async def start(**overrides: Any) -> Served:
            settings = Settings(model=v7_path, data_dir=tmp_path / f"data{next(counter)}", **overrides)
            app = create_app(settings)
            await stack.enter_async_context(app.router.lifespan_context(app))
            await asyncio.wait_for(app.state.services.model.ready.wait(), 60)
            # Unhandled exceptions become the 500 response a real server would send, not a raise here.
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            client = await stack.enter_async_context(
                httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60)
            )
            return Served(app, client, settings)

        yield start


@pytest.fixture
async def served(serve: ServeFactory) -> Served:
    """The app with default settings."""
    return await serve()
