"""The real app in process: `create_app(settings)` inside its lifespan, its model loaded, and an httpx
client over ASGITransport (the shape every in-process API test drives)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
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


@contextlib.asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[Served]:
    """The app on `settings` until the block ends (then its lifespan shuts down: a second block on the
    same data directory is a restart)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.services.model.ready.wait(), 60)
        # Unhandled exceptions become the 500 response a real server would send, not a raise here.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield Served(app, client, settings)
