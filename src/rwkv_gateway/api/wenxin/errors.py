"""Baidu's business-error envelope: HTTP 200 with `{"error_code": int, "error_msg": str}`, for everything.

The qianfan SDK raises a generic RequestError on any non-2xx status before reading the body, which
would hide codes it acts on (110/111 refresh the token, 2/18/336100 are retried), so every failure on
this dialect's paths (validation, auth, unknown api_name, oversized body, 404/405, a full queue, an
unexpected exception) is a 200 carrying the code from the Baidu error table. The body is one compact
JSON line, as the SDK's stream parser reads only the first line of an `application/json` answer.
Only `/oauth/2.0/token`'s own credential errors differ: they use the RFC 6749 shape (see router.py).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from rwkv_gateway.api.common.errors import BodyTooLarge, first_validation_problem
from rwkv_gateway.errors import (
    GatewayError,
    GenerationFailed,
    InvalidParameter,
    NotReady,
    PromptTooLong,
    ServerBusy,
)

# The codes of Baidu's error table this dialect uses.
UNKNOWN_ERROR = 1
UNAVAILABLE = 2
UNSUPPORTED_METHOD = 3
IAM_FAILED = 14
INVALID_PARAMETER = 100
TOKEN_INVALID = 110
TOKEN_EXPIRED = 111
INTERNAL_ERROR = 336000
INVALID_ARGUMENT = 336001
INVALID_JSON = 336002
PARAMETER_ERROR = 336003
API_NAME_NOT_EXIST = 336005
MESSAGES_ERROR = 336006
TRY_AGAIN_LATER = 336100
INVALID_HTTP_METHOD = 336101
PROMPT_TOO_LONG = 336103

MESSAGES = {
    UNKNOWN_ERROR: "Unknown error",
    UNAVAILABLE: "Service temporarily unavailable",
    UNSUPPORTED_METHOD: "Unsupported openapi method",
    IAM_FAILED: "IAM Certification failed",
    INVALID_PARAMETER: "Invalid parameter",
    TOKEN_INVALID: "Access token invalid or no longer valid",
    TOKEN_EXPIRED: "Access token expired",
    INTERNAL_ERROR: "Internal error",
    INVALID_ARGUMENT: "Invalid Argument",
    INVALID_JSON: "Invalid JSON",
    API_NAME_NOT_EXIST: "API name not exist",
    TRY_AGAIN_LATER: "try again later",
    INVALID_HTTP_METHOD: "Invalid HTTP Method",
    PROMPT_TOO_LONG: "Prompt tokens too long",
}


class WenxinError(GatewayError):
    """A failure with its Baidu error code; `message` defaults to the table's text for the code."""

    http_status = 200

    def __init__(self, error_code: int, message: str | None = None, *, param: str | None = None) -> None:
        super().__init__(message or MESSAGES.get(error_code, "Unknown error"), param=param)
        self.error_code = error_code
        self.code = str(error_code)


def parameter_error(field: str, reason: str) -> WenxinError:
    """336003 with a `"<field> is invalid: <reason>"` text that names the field (docs/wenxin.md#7-errors)."""
    return WenxinError(PARAMETER_ERROR, f"{field} is invalid: {reason}", param=field)


def describe(exc: GatewayError) -> tuple[int, str]:
    """(error_code, error_msg) for any domain error."""
    if isinstance(exc, WenxinError):
        return exc.error_code, exc.message
    if isinstance(exc, PromptTooLong):
        return PROMPT_TOO_LONG, f"{MESSAGES[PROMPT_TOO_LONG]}: {exc.message}"
    if isinstance(exc, BodyTooLarge):
        return PARAMETER_ERROR, f"body is invalid: {exc.message}"
    if isinstance(exc, InvalidParameter):
        return PARAMETER_ERROR, f"{exc.param or 'request'} is invalid: {exc.message}"
    if isinstance(exc, ServerBusy):
        # The code qianfan retries with backoff.
        return TRY_AGAIN_LATER, MESSAGES[TRY_AGAIN_LATER]
    if isinstance(exc, NotReady):
        # Also one qianfan retries: the model is still loading.
        return UNAVAILABLE, f"{MESSAGES[UNAVAILABLE]}: {exc.message}"
    if isinstance(exc, GenerationFailed):
        return INTERNAL_ERROR, f"{MESSAGES[INTERNAL_ERROR]}: {exc.message}"
    # Errors raised outside the routes arrive with the HTTP status the router would have used.
    if exc.http_status == 404:
        return UNSUPPORTED_METHOD, MESSAGES[UNSUPPORTED_METHOD]
    if exc.http_status == 405:
        return INVALID_HTTP_METHOD, MESSAGES[INVALID_HTTP_METHOD]
    if exc.http_status < 500:
        return INVALID_ARGUMENT, f"{MESSAGES[INVALID_ARGUMENT]}: {exc.message}"
    return UNKNOWN_ERROR, MESSAGES[UNKNOWN_ERROR]


def error_body(code: int, message: str) -> dict[str, Any]:
    return {"error_code": code, "error_msg": message}


def error_json(exc: GatewayError) -> str:
    """The envelope as one compact line (also the payload of an in-band stream error)."""
    return json.dumps(error_body(*describe(exc)), ensure_ascii=False, separators=(",", ":"))


class WenxinErrors:
    """ErrorRenderer for /oauth/2.0/*, /rpc/2.0/* and the console model-list path."""

    def gateway_error(self, exc: GatewayError) -> Response:
        headers: dict[str, str] = {}
        if isinstance(exc, ServerBusy):
            headers["retry-after"] = str(max(1, round(exc.retry_after)))
        return Response(error_json(exc), status_code=200, media_type="application/json", headers=headers)

    def validation_error(self, exc: RequestValidationError) -> Response:
        # The routes parse their own bodies, so only a malformed query or path gets here.
        param, message = first_validation_problem(exc)
        return self.gateway_error(parameter_error(param or "request", message))
