"""`GET /metrics` (Prometheus exposition of the app's own registry) and the HTTP metrics middleware.

The middleware labels each response by the route template that matched (`/v1/chat/completions`,
`/characters/{character_id}`), never the raw path: a scanner probing random URLs must not create a
time series per URL, so anything no route matched counts as "unmatched".
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rwkv_gateway.api.common.deps import ServicesDep
from rwkv_gateway.services.metrics import GatewayMetrics

router = APIRouter(tags=["observability"])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, services: ServicesDep) -> Response:
    """Prometheus metrics: engine queue and batch, per-dialect tokens, latencies and finish reasons,
    state cache, model load time, HTTP responses by route and status (OpenMetrics on request)."""
    body, content_type = services.metrics.render(request.headers.get("accept", ""))
    return Response(body, media_type=content_type, headers={"Cache-Control": "no-store"})


def _route_of(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return "unmatched"
    return path or "/"  # a Mount at the root (a static UI) has the empty path


class HttpMetrics:
    """Pure ASGI middleware: counts every HTTP response by route, method and status, and times it to
    the end of its body (a stream is timed to its last event)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets when the app fails before starting a response
        started = time.perf_counter()

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            self.metrics.observe_http(
                _route_of(scope), str(scope.get("method", "")), status, time.perf_counter() - started
            )
