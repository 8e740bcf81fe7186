"""The ChatGLM-style routes `POST /chat`, `/chat-stream`, `/embedding`: thin handlers over `serving.py`.

Bodies are parsed here rather than by FastAPI, because the reference reads any body as JSON whatever
its Content-Type (curl's `-d` sends a form type) and its clients rely on that. Every failure is
rendered as `{"detail": "<field>: <reason>"}` by `GLMErrors` (see errors.py).

The reference runs with CORS fully open and browser clients exist, so these paths (and `/tokenize`)
have their own CORS policy (`cors_scope`, applied by the app's one CORS middleware, errors included):
any origin, echoed with credentials; when `RWKV_GATEWAY_CORS_ORIGINS` is set, the app-wide policy.
The error scopes are exact paths: the role-play dialect owns `/chat/...`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from sse_starlette.event import ServerSentEvent
from sse_starlette.sse import EventSourceResponse

from rwkv_gateway.api.common.cors import CORSPolicy, app_policy
from rwkv_gateway.api.common.deps import EngineDep, SettingsDep
from rwkv_gateway.api.common.disconnect import unless_disconnected
from rwkv_gateway.api.common.errors import ErrorRenderer, dialect_route
from rwkv_gateway.api.glm import serving
from rwkv_gateway.api.glm.errors import GLMErrors, invalid_from
from rwkv_gateway.api.glm.schemas import GLMChatRequest, GLMEmbeddingRequest
from rwkv_gateway.errors import InvalidParameter
from rwkv_gateway.settings import Settings

M = TypeVar("M", bound=BaseModel)

PATHS = ("/chat", "/chat-stream", "/embedding")
router = APIRouter(route_class=dialect_route(GLMErrors()), tags=["chatglm"])


def parse_body(raw: bytes, model: type[M]) -> M:
    """The body as JSON whatever its Content-Type, validated into `model` (400 naming the field)."""
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError included; RecursionError: nested too deep
        raise InvalidParameter("not valid JSON", param="body") from None
    if not isinstance(payload, dict):
        raise InvalidParameter("expected a JSON object", param="body")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise invalid_from(exc) from None


async def read_body(request: Request, model: type[M]) -> M:
    return parse_body(await request.body(), model)


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    # The body is read by hand (see the module docstring); this puts its schema back into OpenAPI.
    schema = {"content": {"application/json": {"schema": model.model_json_schema()}}, "required": True}
    return {"requestBody": schema}


def _ping() -> ServerSentEvent:
    return ServerSentEvent(comment=serving.ping_text(), sep="\r\n")


@router.post("/chat", response_model=None, openapi_extra=_body_schema(GLMChatRequest))
async def chat(request: Request, engine: EngineDep, settings: SettingsDep) -> JSONResponse:
    """One-shot chat: `{prompt, history, max_length, top_p, temperature}` -> `{content, prompt_tokens,
    completion_tokens, total_tokens, model, object}`."""
    job = serving.GLMChat(engine, settings, await read_body(request, GLMChatRequest))
    admitted = await job.admit()
    try:
        return JSONResponse(await unless_disconnected(request, job.response(admitted)))
    finally:
        admitted.cancel()


@router.post("/chat-stream", response_model=None, openapi_extra=_body_schema(GLMChatRequest))
async def chat_stream(request: Request, engine: EngineDep, settings: SettingsDep) -> EventSourceResponse:
    """Streamed chat: server-sent events `data: {json}` with only the new text in `content` (append
    with `+=`), cumulative token counts, keep-alive comments, no terminator."""
    job = serving.GLMChat(engine, settings, await read_body(request, GLMChatRequest))
    admitted = await job.admit()  # before the response exists: busy and bad values are real statuses
    return EventSourceResponse(
        job.events(admitted),
        sep="\r\n",
        ping=settings.glm_ping_s,
        ping_message_factory=_ping,
        headers={"Cache-Control": "no-cache"},
    )


@router.post("/embedding", response_model=None, openapi_extra=_body_schema(GLMEmbeddingRequest))
async def embedding(request: Request, engine: EngineDep, settings: SettingsDep) -> dict[str, Any]:
    """Embeddings of `prompt` (a list of texts, or one text for one flat vector): the same vectors
    as `/v1/embeddings`."""
    return await serving.embeddings(engine, settings, await read_body(request, GLMEmbeddingRequest))


def cors_scope(settings: Settings) -> tuple[Iterable[str], CORSPolicy]:
    """This dialect's paths and their CORS policy: open while no app-wide origins are set."""
    return (*PATHS, "/tokenize"), app_policy(settings) or CORSPolicy(("*",), credentials=True)


def error_scopes() -> list[tuple[str, ErrorRenderer]]:
    """(path, renderer) pairs for errors raised outside this dialect's routes (404, 405, 500).

    Exact paths only (no trailing "/"): `/chat/...` belongs to the role-play dialect.
    """
    renderer = GLMErrors()
    return [(path, renderer) for path in PATHS]
