"""Shared route dependencies: collaborators read from `request.app.state`, set up by the lifespan."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from rwkv_gateway.domain.engine import Engine
from rwkv_gateway.errors import NotReady
from rwkv_gateway.settings import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_engine(request: Request) -> Engine:
    """The engine, or NotReady while the model is still loading (or failed to load)."""
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None:
        raise NotReady("the model is still loading")
    return engine


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
