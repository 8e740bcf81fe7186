"""Each dialect renders its own errors: a route class that turns every failure inside a route into
that dialect's envelope, plus the request-body size limit.

FastAPI's exception handlers are global, but the same failure (a bad field, a full queue) must look
different on `/v1/*` than on the Baidu or role-play routes. So each dialect's router uses a route
class built by `dialect_route(renderer)`: body validation errors, `GatewayError`s raised by
dependencies, services or the engine, an oversized body and unexpected exceptions are all rendered by
that dialect's `ErrorRenderer` (which never produces an HTML page or a bare 500).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rwkv_gateway.errors import GatewayError

logger = logging.getLogger(__name__)


class BodyTooLarge(GatewayError):
    code = "request_too_large"
    http_status = 413


class _HTTPStatusError(GatewayError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.http_status = status
        self.code = "invalid_request" if status < 500 else "internal_error"


def _from_http(exc: HTTPException) -> GatewayError:
    return _HTTPStatusError(str(exc.detail), exc.status_code)


class ErrorRenderer(Protocol):
    def gateway_error(self, exc: GatewayError) -> Response: ...

    def validation_error(self, exc: RequestValidationError) -> Response: ...


def first_validation_problem(exc: RequestValidationError) -> tuple[str | None, str]:
    """(field path, readable message) of the first validation error; the body prefix is dropped."""
    errors = exc.errors()
    if not errors:
        return None, "invalid request"
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    msg = str(err.get("msg", "invalid value"))
    if err.get("type") == "json_invalid":
        return None, "the request body is not valid JSON"
    if err.get("type") == "missing":
        return param, f"missing required parameter: {param}"
    return param, f"invalid value for {param}: {msg}" if param else msg


def dialect_route(renderer: ErrorRenderer) -> type[APIRoute]:
    class DialectRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestValidationError as exc:
                    return renderer.validation_error(exc)
                except GatewayError as exc:
                    return renderer.gateway_error(exc)
                except HTTPException as exc:
                    # FastAPI turns any failure while reading the body into a 400 HTTPException; the
                    # size limit's own error is the cause in that case.
                    if isinstance(exc.__cause__, GatewayError):
                        return renderer.gateway_error(exc.__cause__)
                    return renderer.gateway_error(_from_http(exc))
                except Exception:
                    logger.exception("unhandled error on %s %s", request.method, request.url.path)
                    return renderer.gateway_error(GatewayError("internal server error"))

            return guarded

    return DialectRoute


class BodySizeLimit:
    """ASGI middleware: refuse bodies over `limit` bytes.

    The body is counted as the route reads it (chunked uploads included, and a lying Content-Length
    too): crossing the limit raises `BodyTooLarge` inside the route, whose dialect renders a 413. At
    most `limit` bytes plus one chunk are ever read.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = 0
        limit = self.limit

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(f"the request body is larger than {limit} bytes")
            return message

        await self.app(scope, limited, send)
