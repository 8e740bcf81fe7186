"""The /v1 routes (and vLLM-style /tokenize, /detokenize): thin handlers over `serving.py`."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from rwkv_gateway.api.common.deps import EngineDep, KeyDep, SettingsDep
from rwkv_gateway.api.common.disconnect import unless_disconnected
from rwkv_gateway.api.common.errors import dialect_route
from rwkv_gateway.api.openai import serving
from rwkv_gateway.api.openai.chat import ChatCompletion
from rwkv_gateway.api.openai.errors import OpenAIErrors
from rwkv_gateway.api.openai.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from rwkv_gateway.api.openai.tools import chat_messages
from rwkv_gateway.domain.prompts import chat_template
from rwkv_gateway.errors import InvalidParameter

route_class = dialect_route(OpenAIErrors())
router = APIRouter(prefix="/v1", route_class=route_class, tags=["openai"])

_STARTED = int(time.time())


def _sse(events: Any) -> EventSourceResponse:
    # No `event:` field and LF separators, as the OpenAI SDKs expect; pings are SSE comments.
    return EventSourceResponse(events, sep="\n", ping=15, headers={"Cache-Control": "no-cache"})


@router.get("/models")
async def list_models(engine: EngineDep, settings: SettingsDep, _key: KeyDep) -> dict[str, Any]:
    """The served model (one per process), with the chat template it is served with."""
    return {"object": "list", "data": [serving.model_card(engine.info, _STARTED, settings)]}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, engine: EngineDep, settings: SettingsDep, _key: KeyDep) -> dict[str, Any]:
    """One model; an unknown id is a 404 `model_not_found`."""
    serving.check_model(model_id, engine.info)
    return serving.model_card(engine.info, _STARTED, settings)


async def _respond(
    request: Request, job: ChatCompletion | serving.TextCompletion, key: str | None, stream: bool
) -> JSONResponse | EventSourceResponse:
    # Admission happens before a response exists, so "busy" and bad values are real statuses.
    admitted = await job.admit(key)
    if stream:
        return _sse(job.events(admitted))
    try:
        return JSONResponse(await unless_disconnected(request, job.response(admitted)))
    finally:
        admitted.cancel()


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    request: Request, body: ChatCompletionRequest, engine: EngineDep, settings: SettingsDep, key: KeyDep
) -> JSONResponse | EventSourceResponse:
    """Chat completions, streamed (SSE, `data: [DONE]` last) or not."""
    return await _respond(request, ChatCompletion(engine, settings, body), key, body.stream)


@router.post("/completions", response_model=None)
async def completions(
    request: Request, body: CompletionRequest, engine: EngineDep, settings: SettingsDep, key: KeyDep
) -> JSONResponse | EventSourceResponse:
    """Legacy text completions: the prompt is raw text (no chat template)."""
    return await _respond(request, serving.TextCompletion(engine, settings, body), key, body.stream)


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, engine: EngineDep, _key: KeyDep) -> dict[str, Any]:
    """Embeddings: the L2-normalised hidden vector the model's final layer keeps for the text's last
    token (docs/openai.md#5-embeddings). `dimensions` truncates and renormalises."""
    return await serving.embeddings(engine, body)


# vLLM-style token utilities (SillyTavern counts tokens with them). They sit at the root path; the
# GLM dialect shares /tokenize, and `api/tokenize.py` picks the shape by the request body.
utility_router = APIRouter(route_class=route_class, tags=["openai"])


async def vllm_tokenize(body: TokenizeRequest, engine: EngineDep, settings: SettingsDep) -> dict[str, Any]:
    serving.check_model(body.model, engine.info)
    if body.messages is not None:
        # Counted the way chat requests are tokenized: turn by turn.
        template = chat_template(settings, engine.info)
        messages = chat_messages(body.messages)
        pieces = template.segments(messages, add_generation_prompt=body.add_generation_prompt)
        tokens = [t for piece in pieces for t in engine.codec.encode(piece)]
    elif body.prompt is not None:
        tokens = engine.codec.encode(body.prompt)
    else:
        raise InvalidParameter("either prompt or messages is required", param="prompt")
    return {"count": len(tokens), "max_model_len": settings.max_prompt_tokens, "tokens": tokens}


@utility_router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, engine: EngineDep, _key: KeyDep) -> dict[str, Any]:
    """Token ids -> text (vLLM shape)."""
    serving.check_model(body.model, engine.info)
    vocab = engine.info.vocab_size
    if any(t >= vocab for t in body.tokens):
        raise InvalidParameter(f"token ids must be below {vocab}", param="tokens")
    return {"prompt": engine.codec.decode(body.tokens)}


def wants_vllm_shape(payload: object) -> bool:
    """vLLM and GLM clients share POST /tokenize: a `model` or `add_special_tokens` key means vLLM."""
    return isinstance(payload, dict) and ("model" in payload or "add_special_tokens" in payload)
