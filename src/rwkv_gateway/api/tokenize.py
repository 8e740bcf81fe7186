"""POST /tokenize, shared by two dialects on one path (wire-protocols C.5).

A body with a `model` or `add_special_tokens` key is a vLLM-style request (SillyTavern counting
tokens) answered by the OpenAI dialect; anything else gets the ChatGLM shape `{tokenIds, tokens}`,
where a token whose bytes are not valid UTF-8 on its own is written as `<0xHH>` per byte.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from rwkv_gateway.api.common.auth import openai_key
from rwkv_gateway.api.common.deps import get_engine, get_settings
from rwkv_gateway.api.openai.errors import OpenAIErrors
from rwkv_gateway.api.openai.router import vllm_tokenize, wants_vllm_shape
from rwkv_gateway.api.openai.schemas import TokenizeRequest
from rwkv_gateway.domain.engine import TextCodec
from rwkv_gateway.errors import GatewayError

router = APIRouter(tags=["tokenize"])
_openai_errors = OpenAIErrors()


class GLMTokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: StrictStr
    max_length: int = Field(default=4096, ge=1)


def readable_token(codec: TextCodec, token_id: int) -> str:
    raw = codec.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"<0x{b:02X}>" for b in raw)


def _glm_error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


@router.post("/tokenize", response_model=None)
async def tokenize(request: Request) -> JSONResponse | dict[str, Any]:
    """Token ids of a prompt: vLLM shape `{count, tokens, max_model_len}` or GLM `{tokenIds, tokens}`."""
    try:
        payload = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        payload = None
    try:
        engine = get_engine(request)
        settings = get_settings(request)
        if wants_vllm_shape(payload):
            try:
                body = TokenizeRequest.model_validate(payload)
            except ValidationError as exc:
                return _openai_errors.validation_error(RequestValidationError(exc.errors()))
            await openai_key(request)
            return await vllm_tokenize(body, engine, settings)
    except GatewayError as exc:
        if wants_vllm_shape(payload):
            return _openai_errors.gateway_error(exc)
        return _glm_error(exc.message, exc.http_status)
    if not isinstance(payload, dict):
        return _glm_error("body: expected a JSON object")
    try:
        glm = GLMTokenizeRequest.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "body"
        return _glm_error(f"{field}: {err['msg']}")
    ids = engine.codec.encode(glm.prompt)[: glm.max_length]
    return {"tokenIds": ids, "tokens": [readable_token(engine.codec, t) for t in ids]}
