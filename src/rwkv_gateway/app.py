"""Composition root: `create_app(settings)` builds the FastAPI app; its lifespan owns every resource.

Start-up order: data dir, database migrations, DB engine, request logger, then the model — loaded in a
worker thread so `/healthz` answers at once and `/readyz` says 503 until the model is in. Tear-down
runs in reverse. Nothing here happens at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from rwkv_gateway import __version__
from rwkv_gateway.api import health, tokenize
from rwkv_gateway.api.common.cors import PathCORS, app_policy
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
from rwkv_gateway.db.session import SqlStorage, create_db_engine, make_session_factory
from rwkv_gateway.domain.engine import Engine
from rwkv_gateway.engine import runtime
from rwkv_gateway.engine.scheduler import Scheduler
from rwkv_gateway.errors import GatewayError, NotReady, ServerBusy
from rwkv_gateway.services.credentials import CredentialService
from rwkv_gateway.services.metrics import GatewayMetrics, chain
from rwkv_gateway.services.requestlog import RequestLogger
from rwkv_gateway.services.roleplay import RoleplayService
from rwkv_gateway.services.roleplay_guests import sweep_guests_forever
from rwkv_gateway.services.tasks import TaskConfig, TaskService
from rwkv_gateway.services.users import UserService
from rwkv_gateway.settings import Settings

logger = logging.getLogger(__name__)


async def _load_engine(app: FastAPI, settings: Settings, request_logger: RequestLogger) -> None:
    state = app.state
    metrics: GatewayMetrics = state.metrics
    try:
        started = time.perf_counter()
        loaded = await asyncio.to_thread(runtime.load, settings)
        on_finish = chain(request_logger.record, metrics.record)
        engine = runtime.build_scheduler(settings, loaded, on_finish=on_finish)
        await engine.start()
        metrics.model_loaded(time.perf_counter() - started)
    except GatewayError as exc:
        state.load_error = exc.message
        logger.error("model load failed: %s", exc.message)
        on_fail: Callable[[], None] | None = getattr(state, "on_load_failure", None)
        if on_fail is not None:
            on_fail()
        return
    except Exception as exc:
        state.load_error = f"{type(exc).__name__}: {exc}"
        logger.exception("model load failed")
        on_fail = getattr(state, "on_load_failure", None)
        if on_fail is not None:
            on_fail()
        return
    state.engine = engine
    state.model_ready.set()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    settings: Settings = state.settings
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(upgrade, settings.database_url)
    db_engine = create_db_engine(settings.database_url)
    state.db_engine = db_engine
    state.sessions = make_session_factory(db_engine)
    storage = SqlStorage(state.sessions)
    state.credentials = CredentialService(storage)
    # Role-play: accounts, conversations, and the idle-guest sweeper.
    state.roleplay_users = UserService(state.sessions, defaults_dir=settings.roleplay_default_characters)
    state.roleplay = RoleplayService(
        storage,
        lambda: get_engine_of(app),
        max_reply_tokens=settings.roleplay_max_reply_tokens,
        max_avatar_bytes=settings.roleplay_max_avatar_bytes,
    )
    guest_sweeper = asyncio.create_task(
        sweep_guests_forever(
            state.roleplay.guests, settings.roleplay_guest_ttl_s, settings.roleplay_guest_sweep_s
        ),
        name="roleplay-guest-sweeper",
    )
    request_logger = RequestLogger(storage)
    await request_logger.start()
    state.request_logger = request_logger
    # Task API: the task registry (its runs need the engine, which each call passes in).
    state.tasks = TaskService(
        storage,
        TaskConfig(
            tmp_idle_s=settings.task_tmp_idle_s,
            tmp_max=settings.task_tmp_max,
            cache_size=settings.task_cache_size,
            sweep_s=settings.task_sweep_s,
            max_segment_tokens=settings.max_new_tokens,
        ),
    )
    await state.tasks.start()
    state.model_ready = asyncio.Event()
    state.load_error = None
    injected: Scheduler | None = state.injected_engine
    load_task: asyncio.Task[None] | None = None
    if injected is not None:
        if injected.on_finish is None:
            injected.on_finish = chain(request_logger.record, state.metrics.record)
        await injected.start()
        state.engine = injected
        state.model_ready.set()
    else:
        load_task = asyncio.create_task(_load_engine(app, settings, request_logger), name="model-load")
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
        await state.tasks.aclose()  # runs record their state while the engine still runs
        engine: Scheduler | None = getattr(state, "engine", None)
        if engine is not None and injected is None:
            await engine.aclose()
        state.engine = None
        await request_logger.aclose()
        await db_engine.dispose()


async def end_generation(app: FastAPI) -> None:
    """The drain deadline (SIGTERM, `drain_timeout_s`) has passed: end what still generates. Task API
    runs stop and record their state, then the engine ends every waiting and running stream as
    cancelled ("server shutting down"), so each dialect still writes its in-band error and its
    terminator before the connection closes. The lifespan's own tear-down runs afterwards as usual."""
    app.state.draining = True
    tasks: TaskService | None = getattr(app.state, "tasks", None)
    if tasks is not None:
        await tasks.aclose()
    engine: Scheduler | None = getattr(app.state, "engine", None)
    if engine is not None:
        logger.warning("drain timeout passed: ending the requests still running")
        await engine.aclose()


def get_engine_of(app: FastAPI) -> Engine:
    """The loaded engine, or NotReady (for services that reach the engine outside a request)."""
    engine: Engine | None = getattr(app.state, "engine", None)
    if engine is None:
        raise NotReady("the model is still loading")
    return engine


def _error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _renderer_for(request: Request) -> ErrorRenderer | None:
    """The dialect that owns this path renders errors raised outside its routes (404, 405, 500).

    Entries ending in "/" are prefixes (which also own the bare path without the slash); others match
    exactly. The first match wins, so more specific entries come first.
    """
    renderers: list[tuple[str, ErrorRenderer]] = request.app.state.error_renderers
    path = request.url.path
    for scope, renderer in renderers:
        if scope.endswith("/"):
            if path == scope.rstrip("/") or path.startswith(scope):
                return renderer
        elif path == scope:
            return renderer
    return None


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    if (renderer := _renderer_for(request)) is not None:
        return renderer.gateway_error(exc)
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if isinstance(exc, ServerBusy) else None
    return JSONResponse(_error_body(exc.code, exc.message), status_code=exc.http_status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if (renderer := _renderer_for(request)) is not None:
        error = GatewayError(str(exc.detail))
        error.http_status = exc.status_code
        error.code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        response = renderer.gateway_error(error)
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response
    return await http_exception_handler(request, exc)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    if (renderer := _renderer_for(request)) is not None:
        return renderer.gateway_error(GatewayError("internal server error"))
    return JSONResponse(_error_body("internal_error", "internal server error"), status_code=500)


class _GatewayApp(FastAPI):
    """FastAPI with request ids and HTTP metrics as its outermost layer, outside even Starlette's
    500 handler, so the response to an unexpected failure is counted and carries its id too."""

    def build_middleware_stack(self) -> ASGIApp:
        return RequestId(HttpMetrics(super().build_middleware_stack(), self.state.metrics))


def create_app(settings: Settings, *, engine: Scheduler | None = None) -> FastAPI:
    """Build the app. `engine` injects a ready-built engine (tests); otherwise the lifespan loads one."""
    app = _GatewayApp(
        title="rwkv-gateway",
        version=__version__,
        summary="One RWKV model behind the OpenAI, wenxinworkshop, ChatGLM, role-play and Task APIs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.injected_engine = engine
    app.state.engine = None
    # Per app, never the global registry: figures of one app (tests build many) stay its own.
    app.state.metrics = GatewayMetrics(lambda: app.state.engine, queue_size=settings.queue_size)
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
    app.state.error_renderers = [
        *tasks_router.error_scopes(),
        *wenxin_router.error_scopes(),
        *glm_router.error_scopes(),
        *roleplay_router.error_scopes(),
        ("/v1/", OpenAIErrors()),
    ]
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    return app
