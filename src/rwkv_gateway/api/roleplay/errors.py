"""The role-play envelope `{"data", "message", "code"}` (HTTP 200) for every outcome of these routes.

Byte layout as the reference's Flask `json.dumps`: keys in the order data, message, code, `", "`
and `": "` separators, non-ASCII written raw, no trailing newline (docs/roleplay.md#3-the-envelope).
Failures the reference never had (an oversized body, the model still loading, a full queue, unknown
paths or methods, unexpected errors) get the envelope too, with a Chinese message in the reference's
style.
"""

# ruff: noqa: RUF001  (the reference's messages use full-width punctuation)

from __future__ import annotations

import json
from typing import Any

from fastapi import Response
from fastapi.exceptions import RequestValidationError

from rwkv_gateway.api.common.errors import BodyTooLarge
from rwkv_gateway.errors import GatewayError, GenerationFailed, InvalidParameter, NotReady, ServerBusy
from rwkv_gateway.services.roleplay_types import MSG_EMPTY, RoleplayFailure

MEDIA_TYPE = "application/json; charset=utf-8"


def envelope(data: Any = None, message: str = "success", code: int = 200) -> Response:
    body = json.dumps({"data": data, "message": message, "code": code}, ensure_ascii=False)
    return Response(body.encode("utf-8"), media_type=MEDIA_TYPE)


def _message(exc: GatewayError) -> tuple[str, int]:
    if isinstance(exc, RoleplayFailure):
        return exc.message, exc.status
    if isinstance(exc, BodyTooLarge):
        return "请求内容过大", 413
    if isinstance(exc, NotReady):
        return "模型尚未加载完成，请稍后再试", 503
    if isinstance(exc, ServerBusy):
        return "服务器繁忙，请稍后再试", 503
    if isinstance(exc, InvalidParameter):
        return f"参数错误：{exc.message}", 400
    if isinstance(exc, GenerationFailed):
        return f"生成失败：{exc.message}", 500
    if exc.http_status == 404:
        return "接口不存在", 404
    if exc.http_status == 405:
        return "请求方法不允许", 405
    if 400 <= exc.http_status < 500:
        return f"请求错误：{exc.message}", exc.http_status
    return "服务器内部错误", 500


class RoleplayErrors:
    """ErrorRenderer of the role-play dialect: always HTTP 200 and the envelope."""

    def gateway_error(self, exc: GatewayError) -> Response:
        message, code = _message(exc)
        return envelope(None, message, code)

    def validation_error(self, exc: RequestValidationError) -> Response:  # noqa: ARG002
        # Routes parse their own parameters; anything FastAPI would reject is a missing field here.
        return envelope(None, MSG_EMPTY, 400)
