"""The OpenAI error envelope `{"error": {"message", "type", "param", "code"}}` and its statuses.

Validation problems are 400 (never FastAPI's 422), a full queue is 503 with Retry-After, and
non-transient server errors say `x-should-retry: false` so SDK clients do not retry them in vain.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from rwkv_gateway.api.common.errors import BodyTooLarge, first_validation_problem
from rwkv_gateway.errors import (
    Forbidden,
    GatewayError,
    InvalidParameter,
    NotFound,
    NotReady,
    PromptTooLong,
    ServerBusy,
    Unauthorized,
)


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe(exc: GatewayError) -> tuple[int, str, str]:
    """(HTTP status, error type, error code) for a domain error."""
    if isinstance(exc, PromptTooLong):
        return 400, "invalid_request_error", "context_length_exceeded"
    if isinstance(exc, InvalidParameter):
        return 400, "invalid_request_error", "invalid_value"
    if isinstance(exc, BodyTooLarge):
        return 413, "invalid_request_error", "request_too_large"
    if isinstance(exc, Unauthorized):
        return 401, "invalid_request_error", "invalid_api_key"
    if isinstance(exc, Forbidden):
        return 403, "invalid_request_error", "forbidden"
    if isinstance(exc, NotFound):
        return 404, "invalid_request_error", exc.code
    if isinstance(exc, ServerBusy):
        return 503, "server_error", "overloaded"
    if isinstance(exc, NotReady):
        return 503, "server_error", "model_not_ready"
    if exc.http_status < 500:
        return exc.http_status, "invalid_request_error", exc.code
    return exc.http_status, "server_error", "internal_error"


def stream_error_event(exc: GatewayError) -> str:
    """The in-band error a stream carries once its headers are sent (the SDK raises APIError)."""
    _, type_, code = describe(exc)
    return json.dumps(error_body(exc.message, type_, code, exc.param), ensure_ascii=False)


class OpenAIErrors:
    """ErrorRenderer for the /v1 routes."""

    def gateway_error(self, exc: GatewayError) -> JSONResponse:
        status, type_, code = describe(exc)
        headers: dict[str, str] = {}
        if isinstance(exc, ServerBusy | NotReady):
            retry = exc.retry_after if isinstance(exc, ServerBusy) else 5.0
            headers["retry-after"] = str(max(1, round(retry)))
            headers["x-should-retry"] = "true"
        elif status >= 500 or status == 429:
            headers["x-should-retry"] = "false"
        return JSONResponse(
            error_body(exc.message, type_, code, exc.param), status_code=status, headers=headers
        )

    def validation_error(self, exc: RequestValidationError) -> JSONResponse:
        param, message = first_validation_problem(exc)
        missing = any(e.get("type") == "missing" for e in exc.errors()[:1])
        code = "missing_required_parameter" if missing else "invalid_value"
        return JSONResponse(error_body(message, "invalid_request_error", code, param), status_code=400)
