"""The routes' collaborators: `Services`, the one typed container that `create_app` builds and keeps as
`app.state.services`, and the `Annotated` dependencies that hand its parts to route handlers.

The model loads in the background after start-up, so the engine sits in a `ModelSlot`: `EngineDep`
raises NotReady until the engine is in (each dialect renders that as its "not ready" error), and
`/readyz` reads the slot's state. Tests swap a collaborator by building the container differently.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from rwkv_gateway.api.common.auth import OpenAIKeys
from rwkv_gateway.domain.engine import Engine
from rwkv_gateway.domain.storage import Storage, StorageHealth, UnitOfWork
from rwkv_gateway.errors import NotReady
from rwkv_gateway.services.credentials import CredentialService
from rwkv_gateway.services.metrics import GatewayMetrics
from rwkv_gateway.services.requestlog import RequestLogger
from rwkv_gateway.services.roleplay import RoleplayService
from rwkv_gateway.services.tasks import TaskService
from rwkv_gateway.services.users import UserService
from rwkv_gateway.settings import Settings


class ModelSlot:
    """Where the engine arrives once the model has loaded, and what readiness says meanwhile.

    `load_error` is set when loading failed (readiness then says "failed", and `on_load_failure`,
    which the CLI sets to stop its server, is called); `draining` is set when shutdown begins.
    """

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.ready = asyncio.Event()
        self.load_error: str | None = None
        self.draining = False
        self.on_load_failure: Callable[[], None] | None = None
        self._close: Callable[[], Awaitable[None]] | None = None

    def current(self) -> Engine | None:
        return self.engine

    def get(self) -> Engine:
        """The engine, or NotReady while the model is still loading (or failed to load)."""
        if self.engine is None:
            raise NotReady("the model is still loading")
        return self.engine

    def loaded(self, engine: Engine, close: Callable[[], Awaitable[None]]) -> None:
        """The engine is in; `close` stops it (the composition root's handle, which routes never see)."""
        self.engine = engine
        self._close = close
        self.ready.set()

    async def close(self) -> None:
        """Stop the loaded engine: every waiting and running stream ends as cancelled."""
        if self.engine is not None and self._close is not None:
            await self._close()

    def failed(self, error: str) -> None:
        self.load_error = error
        if self.on_load_failure is not None:
            self.on_load_failure()


@dataclass(frozen=True, slots=True)
class Services:
    """Everything the routes use, as the real classes (mypy checks each call against them)."""

    settings: Settings
    model: ModelSlot
    metrics: GatewayMetrics
    credentials: CredentialService
    openai_keys: OpenAIKeys
    users: UserService
    roleplay: RoleplayService
    tasks: TaskService
    request_log: RequestLogger
    #: The database the services share (the lifespan opens it; tests read rows through it).
    storage: Storage[UnitOfWork]
    #: The same database, as `/readyz` sees it.
    database: StorageHealth


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_settings(services: ServicesDep) -> Settings:
    return services.settings


def get_engine(services: ServicesDep) -> Engine:
    """The engine, or NotReady while the model is still loading (or failed to load)."""
    return services.model.get()


def get_credentials(services: ServicesDep) -> CredentialService:
    return services.credentials


def get_users(services: ServicesDep) -> UserService:
    return services.users


def get_roleplay(services: ServicesDep) -> RoleplayService:
    return services.roleplay


def get_tasks(services: ServicesDep) -> TaskService:
    return services.tasks


async def openai_key(request: Request, services: ServicesDep) -> str | None:
    """The id of the presented OpenAI key when keys are configured, else None (open API); 401 when
    keys exist and the request has none or a wrong one (`api/common/auth.py`)."""
    return await services.openai_keys.check(request.headers.get("authorization", ""))


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
CredentialsDep = Annotated[CredentialService, Depends(get_credentials)]
UsersDep = Annotated[UserService, Depends(get_users)]
RoleplayDep = Annotated[RoleplayService, Depends(get_roleplay)]
TasksDep = Annotated[TaskService, Depends(get_tasks)]
KeyDep = Annotated[str | None, Depends(openai_key)]
