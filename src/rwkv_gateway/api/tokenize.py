"""POST /tokenize, shared by two dialects on one path (docs/glm.md#4-tokenize).

A body with a `model` or `add_special_tokens` key is a vLLM-style request (SillyTavern counting
tokens) answered by the OpenAI dialect; anything else gets the ChatGLM shape `{tokenIds, tokens}`
(`prompt`'s ids truncated to `max_length`, no special tokens; a token whose bytes are not valid
UTF-8 on its own is written as `<0xHH>` per byte) with the GLM dialect's `{"detail": ...}` errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from rwkv_gateway.api.common.deps import get_services
from rwkv_gateway.api.common.errors import BodyTooLarge
from rwkv_gateway.api.glm import serving as glm_serving
from rwkv_gateway.api.glm.errors import GLMErrors
from rwkv_gateway.api.glm.router import parse_body
from rwkv_gateway.api.glm.schemas import GLMTokenizeRequest
from rwkv_gateway.api.glm.serving import readable_token
from rwkv_gateway.api.openai.errors import OpenAIErrors
from rwkv_gateway.api.openai.router import vllm_tokenize, wants_vllm_shape
from rwkv_gateway.api.openai.schemas import TokenizeRequest
from rwkv_gateway.errors import GatewayError

logger = logging.getLogger(__name__)

router = APIRouter(tags=["tokenize"])
_openai_errors = OpenAIErrors()
_glm_errors = GLMErrors()

__all__ = ["readable_token", "router"]


async def _glm_tokenize(request: Request, raw: bytes | BodyTooLarge) -> Response:
    """The GLM shape, with the GLM dialect's errors and CORS headers."""
    try:
        if isinstance(raw, BodyTooLarge):
            raise raw
        body = parse_body(raw, GLMTokenizeRequest)
        engine = get_services(request).model.get()
        # A long prompt takes a while to tokenize: off the event loop.
        response: Response = JSONResponse(await asyncio.to_thread(glm_serving.tokenize, engine, body))
    except GatewayError as exc:
        response = _glm_errors.gateway_error(exc)
    except Exception:
        logger.exception("GLM /tokenize failed")
        response = _glm_errors.gateway_error(GatewayError("internal server error"))
    return response


@router.post("/tokenize", response_model=None)
async def tokenize(request: Request) -> Response | dict[str, Any]:
    """Token ids of a prompt: vLLM shape `{count, tokens, max_model_len}` or GLM `{tokenIds, tokens}`."""
    try:
        raw = await request.body()
    except BodyTooLarge as exc:
        # Too large to read whole, so its shape is unknown: the GLM shape is the default one.
        return await _glm_tokenize(request, exc)
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError included; RecursionError: nested too deep
        payload = None
    if not wants_vllm_shape(payload):
        return await _glm_tokenize(request, raw)
    try:
        services = get_services(request)
        engine = services.model.get()
        settings = services.settings
        try:
            body = TokenizeRequest.model_validate(payload)
        except ValidationError as exc:
            return _openai_errors.validation_error(RequestValidationError(exc.errors()))
        await services.openai_keys.check(request.headers.get("authorization", ""))
        return await vllm_tokenize(body, engine, settings)
    except GatewayError as exc:
        return _openai_errors.gateway_error(exc)
