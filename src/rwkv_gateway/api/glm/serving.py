"""ChatGLM-style serving logic: GLM bodies -> engine requests -> GLM responses and SSE bytes.

A chat request becomes RWKV World turns (docs/glm.md#1-chat-request, docs/chat-prompts.md): every
inner `history` list is split into consecutive (query, answer) pairs, so both
`[["q1", "a1"], ["q2", "a2"]]` and the flattened `[["q1", "a1", "q2", "a2"]]` give the same prompt;
a trailing unpaired element and empty texts are skipped. The prompt goes to the engine one turn per
segment with the reply's follow-up (as the OpenAI dialect does), so a client that resends its history
continues from cached states and prefills only the new turn.

`max_length` is HuggingFace's total length: the reply may use `max_length` minus the formatted
prompt's tokens (capped by the server's max_new_tokens); a `max_length` that leaves no room is a
400. `prompt_tokens` counts the `prompt` field only (docs/glm.md#2-chat-response).
`completion_tokens` counts the reply's text piece by piece as it is streamed, so the last stream
event and the non-streaming response report the same numbers.

The stream (docs/glm.md#3-chat-stream) is one `data: {json}\\r\\n\\r\\n` event per new piece of
text, the JSON written with `", "`/`": "` separators and raw UTF-8, token counts cumulative,
keep-alive comments `: ping - <UTC date-time>` and no terminator. Requests are admitted before any
response exists; a failure after the first byte is one `: error - <reason>` comment, then the stream
ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rwkv_gateway.api.glm.schemas import GLMChatRequest, GLMEmbeddingRequest, GLMTokenizeRequest
from rwkv_gateway.domain.engine import Engine, TextCodec, TokenStream
from rwkv_gateway.domain.prompts import ChatMessage, ChatTemplate, ThinkMode, chat_template
from rwkv_gateway.domain.reasoning import ThinkSplitter, history_followup
from rwkv_gateway.domain.types import GenerationRequest, SamplingParams, TextDelta
from rwkv_gateway.errors import GatewayError, InvalidParameter
from rwkv_gateway.settings import Settings

logger = logging.getLogger(__name__)

CRLF2 = b"\r\n\r\n"
#: Inputs one /embedding call may carry (the OpenAI dialect's bound).
MAX_EMBEDDING_INPUTS = 2048


def model_name(engine: Engine, settings: Settings) -> str:
    return settings.glm_model_name or engine.info.name


def history_pairs(history: Sequence[Sequence[str]]) -> list[tuple[str, str]]:
    """Consecutive (query, answer) pairs of every inner list; a trailing unpaired item is dropped."""
    return [(turn[i], turn[i + 1]) for turn in history for i in range(0, len(turn) - 1, 2)]


def chat_messages(req: GLMChatRequest, template: ChatTemplate) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    for query, answer in history_pairs(req.history):
        if template.normalize(query):
            messages.append(ChatMessage("user", query))
        if template.normalize(answer):
            messages.append(ChatMessage("assistant", answer))
    if template.normalize(req.prompt):
        messages.append(ChatMessage("user", req.prompt))
    return messages


def dumps_event(obj: dict[str, Any]) -> bytes:
    # json.dumps' default separators (", ", ": ") are the reference's bytes; raw UTF-8, no \u escapes.
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + CRLF2


def comment(text: str) -> bytes:
    """One SSE comment; line breaks inside would end it early, so they become spaces."""
    one_line = " ".join(text.splitlines())
    return f": {one_line}".encode() + CRLF2


def ping_text() -> str:
    # sse-starlette 1.6.1 wrote str(datetime.utcnow()); %f keeps the microseconds even when they are 0.
    return f"ping - {datetime.now(UTC):%Y-%m-%d %H:%M:%S.%f}"


class ReplyPieces:
    """The reply as it is sent: trimmed like the whole reply (so the stream adds up to the same
    `content`), a G-series think block left out (docs/glm.md#8-g-series-models), each piece's tokens
    counted as it goes out."""

    def __init__(self, codec: TextCodec, think: ThinkMode = "off") -> None:
        self._codec = codec
        self._split = ThinkSplitter(think)
        self._parts: list[str] = []
        self.completion_tokens = 0

    def push(self, text: str) -> str:
        _, piece = self._split.push(text)
        if piece:
            self.completion_tokens += len(self._codec.encode(piece))
            self._parts.append(piece)
        return piece

    @property
    def text(self) -> str:
        return "".join(self._parts)


@dataclass(slots=True)
class Admitted:
    """An admitted chat request: its engine stream and the `prompt` field's token count."""

    stream: TokenStream
    prompt_tokens: int

    def cancel(self) -> None:
        self.stream.cancel()


class GLMChat:
    """One /chat or /chat-stream request."""

    def __init__(self, engine: Engine, settings: Settings, req: GLMChatRequest) -> None:
        self.engine = engine
        self.settings = settings
        self.req = req
        self.model = model_name(engine, settings)
        self.template = chat_template(settings, engine.info)
        self.think = self.template.think_mode(settings.glm_wenxin_think)  # "off" on World models

    async def engine_request(self) -> tuple[GenerationRequest, int]:
        """The generation request and the token count of the `prompt` field."""
        req, codec = self.req, self.engine.codec
        segments = self.template.segments(chat_messages(req, self.template), think=self.think)

        def count() -> tuple[int, int]:
            # Counted segment by segment, exactly as the engine tokenizes them.
            return sum(len(codec.encode(s)) for s in segments), len(codec.encode(req.prompt))

        formatted, prompt_tokens = await asyncio.to_thread(count)
        room = req.max_length - formatted
        if room <= 0:
            raise InvalidParameter(
                f"{req.max_length} leaves no room for a reply: the formatted prompt (history included) "
                f"has {formatted} tokens",
                param="max_length",
            )
        followup, replaces = history_followup(self.template, self.think)
        request = GenerationRequest(
            prompt_segments=segments,
            reply_followup=followup,
            reply_followup_replaces=replaces,
            sampling=SamplingParams(temperature=req.temperature, top_p=req.top_p),
            max_tokens=min(room, self.settings.max_new_tokens),
            stop=self.template.stops,
            dialect="glm",
        )
        return request, prompt_tokens

    async def admit(self) -> Admitted:
        request, prompt_tokens = await self.engine_request()
        return Admitted(await self.engine.submit(request), prompt_tokens)

    def _body(self, content: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {
            "content": content,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "model": self.model,
            "object": "chat.completion",
        }

    async def response(self, admitted: Admitted) -> dict[str, Any]:
        pieces = ReplyPieces(self.engine.codec, self.think)
        async for event in admitted.stream:
            if isinstance(event, TextDelta):
                pieces.push(event.text)
            elif (failure := event.failure()) is not None:
                raise failure
        return self._body(pieces.text, admitted.prompt_tokens, pieces.completion_tokens)

    async def events(self, admitted: Admitted) -> AsyncIterator[bytes]:
        pieces = ReplyPieces(self.engine.codec, self.think)
        try:
            async for event in admitted.stream:
                if isinstance(event, TextDelta):
                    if piece := pieces.push(event.text):
                        yield dumps_event(self._body(piece, admitted.prompt_tokens, pieces.completion_tokens))
                elif (failure := event.failure()) is not None:
                    raise failure  # sent in-band below
        except GatewayError as exc:
            yield comment(f"error - {exc.message}")
        except Exception:
            logger.exception("GLM stream failed")
            yield comment("error - internal server error")
        finally:
            admitted.cancel()


async def embeddings(engine: Engine, settings: Settings, req: GLMEmbeddingRequest) -> dict[str, Any]:
    """The same vectors as /v1/embeddings; a bare string gives one flat vector."""
    single = isinstance(req.prompt, str)
    texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    for index, text in enumerate(texts):
        if not text:
            raise InvalidParameter("must not be empty", param="prompt" if single else f"prompt[{index}]")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise InvalidParameter(f"at most {MAX_EMBEDDING_INPUTS} texts per request", param="prompt")
    vectors = [vector for vector, _ in await engine.embed(texts)] if texts else []
    data: list[float] | list[list[float]] = vectors[0] if single else vectors
    return {"data": data, "model": model_name(engine, settings), "object": "embedding"}


def readable_token(codec: TextCodec, token_id: int) -> str:
    """A token's bytes as text; bytes that are not whole UTF-8 on their own are `<0xHH>` each."""
    raw = codec.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"<0x{b:02X}>" for b in raw)


def tokenize(engine: Engine, req: GLMTokenizeRequest) -> dict[str, Any]:
    """`{tokenIds, tokens}`: the prompt's ids (no specials) truncated to `max_length`, and each one
    readable."""
    ids = engine.codec.encode(req.prompt)[: req.max_length]
    return {"tokenIds": ids, "tokens": [readable_token(engine.codec, t) for t in ids]}
