"""Liveness and readiness probes for orchestrators and load balancers.

Readiness covers what a request needs: the model, and the database (a cached `SELECT 1`, so a
load balancer stops sending traffic to a replica that cannot reach it, and sends it again once the
database is back, without a restart; docs/operations.md#health).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from rwkv_gateway.api.common.deps import ServicesDep
from rwkv_gateway.domain.prompts import chat_template

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive and its event loop answers."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(services: ServicesDep) -> JSONResponse | dict[str, Any]:
    """503 until the model is loaded, while draining and while the database cannot be reached; then
    the model and engine load figures."""
    model = services.model
    engine = model.engine
    if engine is None or model.draining:
        body: dict[str, Any] = {"status": "draining" if engine is not None else "loading"}
        error = model.load_error
        if error:
            body = {"status": "failed", "error": error}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    database_error = await services.database.unavailable()
    if database_error is not None:
        return JSONResponse(
            {"status": "database_unavailable", "error": database_error},
            status_code=503,
            headers={"Retry-After": "5"},
        )
    info = engine.info
    stats = engine.stats()
    return {
        "status": "ready",
        "model": info.name,
        "model_id": info.model_id,
        "rwkv_version": info.version,
        "strategy": info.strategy,
        "demo_model": info.is_demo,
        "chat_template": chat_template(services.settings, info).name,
        "n_layer": info.n_layer,
        "n_embd": info.n_embd,
        "vocab_size": info.vocab_size,
        "queue_depth": stats["queue_depth"],
        "active_sequences": stats["active_sequences"],
        "database": "ok",
    }
