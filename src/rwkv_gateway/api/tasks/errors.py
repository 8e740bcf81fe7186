"""The Task API's error shape: FastAPI's `{"detail": ...}` with the reference's statuses
(docs/tasks.md#4-errors).

Body validation failures are FastAPI's own 422 `{"detail": [{"type", "loc", "msg", "input"}]}` (the
SDK maps 422 to `RWKVValidationError`); bad values found later (token ids outside the vocabulary, a
prompt over the limit) use the same shape with `loc: ["body", <field>]`. Everything else is
`{"detail": "<message>"}` with the error's status: 404 "Task not found", 400/403 for refused
operations, 409 for a running task, 413 for an oversized body, 503 with Retry-After when busy or
loading, 500 for failures (never an HTML page).
"""

from __future__ import annotations

import math
from typing import Any

from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from rwkv_gateway.errors import GatewayError, InvalidParameter, NotReady, ServerBusy


def value_error_detail(exc: InvalidParameter) -> list[dict[str, Any]]:
    return [{"type": "value_error", "loc": ["body", exc.param or "body"], "msg": exc.message, "input": None}]


class TaskErrors:
    """ErrorRenderer for /v1/tasks/*."""

    def gateway_error(self, exc: GatewayError) -> JSONResponse:
        if isinstance(exc, InvalidParameter):
            return JSONResponse({"detail": value_error_detail(exc)}, status_code=422)
        headers: dict[str, str] = {}
        if isinstance(exc, ServerBusy):
            headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        elif isinstance(exc, NotReady):
            headers["Retry-After"] = "5"
        status = exc.http_status if 400 <= exc.http_status <= 599 else 500
        return JSONResponse({"detail": exc.message}, status_code=status, headers=headers)

    def validation_error(self, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {"detail": jsonable_encoder([_printable(e) for e in exc.errors()])}, status_code=422
        )


def _printable(error: Any) -> Any:
    # A NaN or infinity (Python's json accepts them in a body) cannot be echoed back in strict JSON.
    value = error.get("input") if isinstance(error, dict) else None
    if isinstance(value, float) and not math.isfinite(value):
        return {**error, "input": str(value)}
    return error
