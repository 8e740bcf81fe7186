"""Composition root: `create_app(settings)` builds the FastAPI app and its one typed container of
services (`app.state.services`, `api/common/deps.py`); its lifespan owns every resource.

Start-up order: data dir, database migrations, DB engine (the services' session factory is bound to
it), request logger, then the model — loaded in a worker thread so `/healthz` answers at once and
`/readyz` says 503 until the model is in. Tear-down runs in reverse. Nothing here happens at import
time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from rwkv_gateway import __version__
from rwkv_gateway.api import health, tokenize
from rwkv_gateway.api.common.auth import OpenAIKeys
from rwkv_gateway.api.common.cors import PathCORS, app_policy
from rwkv_gateway.api.common.deps import ModelSlot, Services
from rwkv_gateway.api.common.errors import BodySizeLimit, ErrorRenderer
from rwkv_gateway.api.common.request_id import RequestId
from rwkv_gateway.api.glm import router as glm_router
from rwkv_gateway.api.metrics import HttpMetrics
from rwkv_gateway.api.metrics import router as metrics_router
from rwkv_gateway.api.openai import router as openai_router
from rwkv_gateway.api.openai.errors import OpenAIErrors
from rwkv_gateway.api.roleplay import router as roleplay_router
from rwkv_gateway.api.tasks import router as tasks_router
from rwkv_gateway.api.wenxin import router as wenxin_router
from rwkv_gateway.db.migrate import upgrade
from rwkv_gateway.db.session import (
    DbOptions,
    SqlStorage,
    bind_session_factory,
    create_db_engine,
    make_session_factory,
)
from rwkv_gateway.engine import runtime
from rwkv_gateway.engine.scheduler import Scheduler
from rwkv_gateway.errors import GatewayError, ServerBusy
from rwkv_gateway.services.credentials import CredentialService
from rwkv_gateway.services.metrics import GatewayMetrics, chain
from rwkv_gateway.services.requestlog import RequestLogger
from rwkv_gateway.services.roleplay import RoleplayService
from rwkv_gateway.services.roleplay_guests import sweep_guests_forever
from rwkv_gateway.services.tasks import TaskConfig, TaskService
from rwkv_gateway.services.users import UserService
from rwkv_gateway.settings import Settings

logger = logging.getLogger(__name__)


async def _load_engine(services: Services) -> None:
    settings, metrics, model = services.settings, services.metrics, services.model
    try:
        started = time.perf_counter()
        loaded = await asyncio.to_thread(runtime.load, settings)
        on_finish = chain(services.request_log.record, metrics.record)
        engine = runtime.build_scheduler(settings, loaded, on_finish=on_finish)
        await engine.start()
        metrics.model_loaded(time.perf_counter() - started)
    except GatewayError as exc:
        logger.error("model load failed: %s", exc.message)
        model.failed(exc.message)
        return
    except Exception as exc:
        logger.exception("model load failed")
        model.failed(f"{type(exc).__name__}: {exc}")
        return
    model.loaded(engine, engine.aclose)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI, *, injected: Scheduler | None, storage: SqlStorage) -> AsyncIterator[None]:
    services = services_of(app)
    settings, model = services.settings, services.model
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(upgrade, settings.database_url)
    db_engine = create_db_engine(settings.database_url, options=_db_options(settings))
    bind_session_factory(storage.sessions, db_engine)
    guest_sweeper = asyncio.create_task(
        sweep_guests_forever(
            services.roleplay.guests, settings.roleplay_guest_ttl_s, settings.roleplay_guest_sweep_s
        ),
        name="roleplay-guest-sweeper",
    )
    await services.request_log.start()
    await services.tasks.start()
    load_task: asyncio.Task[None] | None = None
    if injected is not None:
        if injected.on_finish is None:
            injected.on_finish = chain(services.request_log.record, services.metrics.record)
        await injected.start()
        model.loaded(injected, injected.aclose)
    else:
        load_task = asyncio.create_task(_load_engine(services), name="model-load")
    try:
        yield
    finally:
        guest_sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await guest_sweeper
        if load_task is not None and not load_task.done():
            load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await load_task
        await services.tasks.aclose()  # runs record their state while the engine still runs
        if injected is None:
            await model.close()
        model.engine = None
        await services.request_log.aclose()
        await db_engine.dispose()


def _db_options(settings: Settings) -> DbOptions:
    return DbOptions(
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout_s=settings.db_pool_timeout_s,
        connect_timeout_s=settings.db_connect_timeout_s,
        statement_timeout_s=settings.db_statement_timeout_s,
    )


def services_of(app: FastAPI) -> Services:
    """The app's container of services (for the server and the CLI; routes use `ServicesDep`)."""
    services: Services = app.state.services
    return services


def _build_services(settings: Settings, model: ModelSlot, storage: SqlStorage) -> Services:
    """The container the routes read: every service on one storage, whose session factory the
    lifespan binds to the database once it is migrated and open."""
    credentials = CredentialService(storage)
    # Role-play: accounts and conversations; the lifespan runs the idle-guest sweeper.
    roleplay = RoleplayService(
        storage,
        model.get,
        max_reply_tokens=settings.roleplay_max_reply_tokens,
        max_avatar_bytes=settings.roleplay_max_avatar_bytes,
    )
    # Task API: the task registry (its runs need the engine, which each call passes in).
    tasks = TaskService(
        storage,
        TaskConfig(
            tmp_idle_s=settings.task_tmp_idle_s,
            tmp_max=settings.task_tmp_max,
            cache_size=settings.task_cache_size,
            sweep_s=settings.task_sweep_s,
            max_segment_tokens=settings.max_new_tokens,
        ),
    )
    # Per app, never the global registry: figures of one app (tests build many) stay its own.
    metrics = GatewayMetrics(model.current, queue_size=settings.queue_size)
    storage.on_error = metrics.db_error  # database outages, counted by kind
    return Services(
        settings=settings,
        model=model,
        metrics=metrics,
        credentials=credentials,
        openai_keys=OpenAIKeys(credentials),
        users=UserService(storage, defaults_dir=settings.roleplay_default_characters),
        roleplay=roleplay,
        tasks=tasks,
        request_log=RequestLogger(storage),
        storage=storage,
        database=storage,
    )


async def end_generation(app: FastAPI) -> None:
    """The drain deadline (SIGTERM, `drain_timeout_s`) has passed: end what still generates. Task API
    runs stop and record their state, then the engine ends every waiting and running stream as
    cancelled ("server shutting down"), so each dialect still writes its in-band error and its
    terminator before the connection closes. The lifespan's own tear-down runs afterwards as usual."""
    services = services_of(app)
    services.model.draining = True
    await services.tasks.aclose()
    if services.model.engine is not None:
        logger.warning("drain timeout passed: ending the requests still running")
        await services.model.close()


def _error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class _ErrorPages:
    """The dialect that owns a path renders errors raised outside its routes (404, 405, 500).

    Scopes ending in "/" are prefixes (which also own the bare path without the slash); others match
    exactly. The first match wins, so more specific entries come first.
    """

    def __init__(self, scopes: list[tuple[str, ErrorRenderer]]) -> None:
        self.scopes = scopes

    def renderer_for(self, request: Request) -> ErrorRenderer | None:
        path = request.url.path
        for scope, renderer in self.scopes:
            if scope.endswith("/"):
                if path == scope.rstrip("/") or path.startswith(scope):
                    return renderer
            elif path == scope:
                return renderer
        return None

    async def gateway_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        if (renderer := self.renderer_for(request)) is not None:
            return renderer.gateway_error(exc)
        headers = (
            {"Retry-After": str(max(1, round(exc.retry_after)))} if isinstance(exc, ServerBusy) else None
        )
        return JSONResponse(_error_body(exc.code, exc.message), status_code=exc.http_status, headers=headers)

    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if (renderer := self.renderer_for(request)) is not None:
            error = GatewayError(str(exc.detail))
            error.http_status = exc.status_code
            error.code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
            response = renderer.gateway_error(error)
            response.headers.update(exc.headers or {})  # e.g. Allow on a 405
            return response
        return await http_exception_handler(request, exc)

    async def unexpected_error(self, request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        if (renderer := self.renderer_for(request)) is not None:
            return renderer.gateway_error(GatewayError("internal server error"))
        return JSONResponse(_error_body("internal_error", "internal server error"), status_code=500)


class _GatewayApp(FastAPI):
    """FastAPI with request ids and HTTP metrics as its outermost layer, outside even Starlette's
    500 handler, so the response to an unexpected failure is counted and carries its id too."""

    def build_middleware_stack(self) -> ASGIApp:
        return RequestId(HttpMetrics(super().build_middleware_stack(), services_of(self).metrics))


def create_app(settings: Settings, *, engine: Scheduler | None = None) -> FastAPI:
    """Build the app. `engine` injects a ready-built engine (tests); otherwise the lifespan loads one."""
    storage = SqlStorage(make_session_factory())  # bound by the lifespan, once the database is open
    app = _GatewayApp(
        title="rwkv-gateway",
        version=__version__,
        summary="One RWKV model behind the OpenAI, wenxinworkshop, ChatGLM, role-play and Task APIs.",
        lifespan=functools.partial(_lifespan, injected=engine, storage=storage),
    )
    app.state.services = _build_services(settings, ModelSlot(), storage)
    app.include_router(health.router)
    app.include_router(metrics_router)
    app.include_router(tasks_router.router)  # /v1/tasks/* before the OpenAI /v1/* routes
    app.include_router(openai_router.router)
    app.include_router(openai_router.utility_router)
    app.include_router(tokenize.router)
    app.include_router(glm_router.router)
    app.include_router(wenxin_router.router)
    app.include_router(roleplay_router.router)
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    # One CORS middleware: the role-play and ChatGLM paths have their own policies, the rest the
    # app-wide one (none while RWKV_GATEWAY_CORS_ORIGINS is empty).
    app.add_middleware(
        PathCORS,
        scopes=[roleplay_router.cors_scope(settings), glm_router.cors_scope(settings)],
        default=app_policy(settings),
    )
    # The optional static UI (mounted after every API route).
    roleplay_router.install(app, settings)
    pages = _ErrorPages(
        [
            *tasks_router.error_scopes(),
            *wenxin_router.error_scopes(),
            *glm_router.error_scopes(),
            *roleplay_router.error_scopes(),
            ("/v1/", OpenAIErrors()),
        ]
    )
    app.add_exception_handler(GatewayError, pages.gateway_error)
    app.add_exception_handler(StarletteHTTPException, pages.http_error)
    app.add_exception_handler(Exception, pages.unexpected_error)
    return app
