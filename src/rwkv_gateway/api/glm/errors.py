"""The ChatGLM-style error shape `{"detail": "<field>: <reason>"}` and its statuses (docs/glm.md#6-errors).

The reference wrapper has no error handling at all (a bare `500 Internal Server Error` for anything).
This dialect keeps its 200 shapes and answers failures with FastAPI's own `{"detail": ...}` shape,
which clients of FastAPI wrappers already read: bad input is a 400 whose detail names the field
(`"max_length: ..."`, `"history[0][1]: ..."`, `"body: ..."`), an oversized body 413, an unknown
method 405, a full queue 503 `{"detail": "server busy"}` and a model still loading 503, both with
`Retry-After`. A server-side failure is a 500 in the same JSON shape rather than the reference's
plain-text page. After a stream has started there is no error event in this protocol: the stream
carries one SSE comment (`: error - <reason>`), which clients ignore like the keep-alive pings,
and then ends.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from rwkv_gateway.errors import GatewayError, InvalidParameter, NotReady, ServerBusy

#: Seconds a client is asked to wait while the model is loading.
NOT_READY_RETRY_S = 5


def field_path(loc: Sequence[int | str]) -> str:
    """`("history", 0, 1)` -> `history[0][1]`; the framework's "body" prefix is dropped."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "body" or path:
            path += f".{part}" if path else str(part)
    return path or "body"


def invalid_from(exc: ValidationError | RequestValidationError) -> InvalidParameter:
    """The first validation problem as an InvalidParameter naming its field."""
    errors = exc.errors()
    if not errors:
        return InvalidParameter("invalid request", param="body")
    err = errors[0]
    field = field_path(err.get("loc", ()))
    kind = err.get("type")
    if kind == "json_invalid":
        return InvalidParameter("not valid JSON", param="body")
    if kind == "missing":
        return InvalidParameter("field required", param=field)
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return InvalidParameter(message, param=field)


def detail(exc: GatewayError) -> str:
    if isinstance(exc, ServerBusy):
        return "server busy"
    if exc.param and not exc.message.startswith(f"{exc.param}:"):
        return f"{exc.param}: {exc.message}"
    return exc.message


def status_of(exc: GatewayError) -> int:
    return exc.http_status if 400 <= exc.http_status < 600 else 500


class GLMErrors:
    """ErrorRenderer for /chat, /chat-stream, /embedding and the GLM shape of /tokenize."""

    def gateway_error(self, exc: GatewayError) -> JSONResponse:
        headers: dict[str, str] = {}
        if isinstance(exc, ServerBusy):
            headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        elif isinstance(exc, NotReady):
            headers["Retry-After"] = str(NOT_READY_RETRY_S)
        return JSONResponse({"detail": detail(exc)}, status_code=status_of(exc), headers=headers)

    def validation_error(self, exc: RequestValidationError) -> JSONResponse:
        return self.gateway_error(invalid_from(exc))
