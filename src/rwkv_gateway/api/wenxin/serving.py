"""wenxinworkshop serving logic: a checked chat request -> engine request -> Baidu response or stream.

Messages go through the shared chat template one turn per prompt segment, with the reply's follow-up
registered, so a client resending its history continues from cached prefix states. Baidu's knobs map
onto the engine's sampler with Baidu's defaults (temperature 0.95, top_p 0.8, penalty_score 1.0 as a
multiplicative repetition penalty on generated tokens). The stream sends one `data: {json}` event per
sentence-sized piece, `sentence_id` from 0, `is_end` on the last; `usage` in every event counts that
event's completion tokens and a running `total_tokens`, as Baidu's documented stream does; no
`[DONE]`. A failure after the first byte sends the text still held back, then one more `data:` event
holding `{"error_code", "error_msg"}` (qianfan raises it as an APIError after the chunks it got), and
the stream ends there. (Baidu documents that error as a bare JSON line; a `data:` line keeps the
stream to one kind of line, and qianfan raises the same APIError for both: docs/wenxin.md#6-chat-stream.)
"""

from __future__ import annotations

import json
import re
import secrets
import string
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from rwkv_gateway.api.wenxin.errors import error_json
from rwkv_gateway.api.wenxin.schemas import WenxinChatRequest
from rwkv_gateway.domain.constraints import OutputConstraint
from rwkv_gateway.domain.engine import Engine, TokenStream
from rwkv_gateway.domain.prompts import ChatMessage, ChatTemplate, ThinkMode, chat_template
from rwkv_gateway.domain.reasoning import ThinkSplitter, constraint_after_think, history_followup, split_reply
from rwkv_gateway.domain.types import Finish, FinishReason, GenerationRequest, SamplingParams, TextDelta
from rwkv_gateway.errors import GatewayError, GenerationFailed, InvalidParameter
from rwkv_gateway.settings import Settings

# Baidu's defaults for omitted knobs (the RWKV-4-World service page and qianfan's own defaults).
DEFAULT_TEMPERATURE = 0.95
DEFAULT_TOP_P = 0.8
DEFAULT_PENALTY = 1.0

_ID_ALPHABET = string.ascii_lowercase + string.digits
#: A piece of a stream ends after a CJK full stop, fullwidth ! ? ;, ASCII ! ? ;, an ellipsis or a newline,
_ENDERS = "\u3002\uff01\uff1f\uff1b!?;\u2026\n"
#: taking along any closing quotes or brackets (ASCII, curly, fullwidth, CJK corner) that follow.
_CLOSERS = "\u201d\u2019\"')\\]\uff09\u3011\u300d\u300f"
#: ASCII dots end a sentence too, unless a digit comes right before ("3.14", a list's "1.").
_SENTENCE_END = re.compile(f"[{_ENDERS}]+[{_CLOSERS}]*|(?<!\\d)\\.+(?!\\d)[{_CLOSERS}]*")
#: A piece with no sentence end is still sent once it is this long, so a stream never stalls.
MAX_PIECE_CHARS = 120


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def response_id() -> str:
    return "as-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))


def chat_messages(req: WenxinChatRequest) -> list[ChatMessage]:
    system = [ChatMessage("system", req.system)] if req.system and req.system.strip() else []
    return [*system, *(ChatMessage(m.role, m.content) for m in req.messages)]


def sampling_params(req: WenxinChatRequest) -> SamplingParams:
    return SamplingParams(
        temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
        top_p=DEFAULT_TOP_P if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        # penalty_score: positive logits of already generated tokens / s, negative ones x s.
        repetition_penalty=DEFAULT_PENALTY if req.penalty_score is None else req.penalty_score,
        penalize_prompt=False,
    )


def max_output_tokens(req: WenxinChatRequest, settings: Settings) -> int:
    if req.max_output_tokens is None:
        return min(settings.default_max_tokens, settings.max_new_tokens)
    if req.max_output_tokens > settings.max_new_tokens:
        raise InvalidParameter(
            f"must be at most {settings.max_new_tokens}, got {req.max_output_tokens}",
            param="max_output_tokens",
        )
    return req.max_output_tokens


def engine_request(
    req: WenxinChatRequest,
    settings: Settings,
    template: ChatTemplate,
    think: ThinkMode,
    *,
    api_key_id: str | None = None,
) -> GenerationRequest:
    """The engine request for `req` on `template` in the think mode `think` (section 8 of docs/wenxin.md)."""
    followup, replaces = history_followup(template, think)
    return GenerationRequest(
        # Turn by turn, so a conversation that resends its history continues from cached states.
        prompt_segments=template.segments(chat_messages(req), think=think),
        reply_followup=followup,
        reply_followup_replaces=replaces,
        # The reply starts after "Assistant:", where RWKV writes a space first; `result` is trimmed.
        constraint=(
            OutputConstraint(kind="json_object", leading_space=True, think=constraint_after_think(think))
            if req.response_format == "json_object"
            else None
        ),
        sampling=sampling_params(req),
        max_tokens=max_output_tokens(req, settings),
        stop=(*template.stops, *(req.stop or ())),
        dialect="wenxin",
        user=req.user_id,
        api_key_id=api_key_id,
    )


def finish_fields(finish: Finish, client_stops: tuple[str, ...]) -> tuple[str, bool]:
    """(finish_reason, is_truncated): `normal` for the chat template's stops and end of text, `stop` for
    a client stop string, `length` (truncated) for the token limit or the request timeout."""
    if finish.reason is FinishReason.STOP:
        matched = finish.stop_matched
        return ("stop" if isinstance(matched, str) and matched in client_stops else "normal"), False
    return "length", True


def split_sentences(text: str) -> tuple[list[str], str]:
    """(complete pieces, the unfinished rest): pieces end at sentence punctuation or a newline."""
    pieces: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        if match.end() == len(text) and text.endswith("."):
            # "v2." may still become "v2.5" or "...": wait for the next character.
            break
        pieces.append(text[start : match.end()])
        start = match.end()
    rest = text[start:]
    while len(rest) >= MAX_PIECE_CHARS:
        pieces.append(rest[:MAX_PIECE_CHARS])
        rest = rest[MAX_PIECE_CHARS:]
    return pieces, rest


@dataclass(slots=True)
class ChatCompletion:
    """One admitted chat request and how its answer is written."""

    stream: TokenStream
    client_stops: tuple[str, ...]
    id: str
    created: int
    #: The G-series think mode: a think block is left out of `result` (docs/wenxin.md#8-g-series-models).
    think: ThinkMode = "off"

    @classmethod
    async def admit(
        cls, engine: Engine, req: WenxinChatRequest, settings: Settings, *, api_key_id: str | None
    ) -> ChatCompletion:
        # Admission before any response exists: a full queue is a real error answer, not a broken stream.
        template = chat_template(settings, engine.info)
        think = template.think_mode(settings.glm_wenxin_think)  # "off" on World models
        request = engine_request(req, settings, template, think, api_key_id=api_key_id)
        stream = await engine.submit(request)
        return cls(stream, tuple(req.stop or ()), response_id(), int(time.time()), think)

    def cancel(self) -> None:
        self.stream.cancel()

    def _body(
        self, result: str, finish_reason: str, truncated: bool, usage: dict[str, int]
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "result": result,
            "is_truncated": truncated,
            "need_clear_history": False,
            "finish_reason": finish_reason,
            "usage": usage,
        }

    def _usage(self, completion: int, total_completion: int) -> dict[str, int]:
        prompt = self.stream.prompt_token_count
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + total_completion,
        }

    async def response(self) -> dict[str, Any]:
        text, finish = await self.stream.collect()
        if (failure := finish.failure()) is not None:
            raise failure
        reason, truncated = finish_fields(finish, self.client_stops)
        completion = finish.usage.completion_tokens
        _, answer = split_reply(text, self.think)
        return self._body(answer, reason, truncated, self._usage(completion, completion))

    def _chunk(
        self,
        sentence_id: int,
        result: str,
        *,
        is_end: bool,
        reason: str,
        truncated: bool,
        usage: dict[str, int],
    ) -> str:
        body = self._body(result, reason, truncated, usage)
        # Baidu's key order: the stream fields sit between `created` and `is_truncated`.
        ordered = {
            "id": body["id"],
            "object": body["object"],
            "created": int(time.time()),
            "sentence_id": sentence_id,
            "is_end": is_end,
            **{k: v for k, v in body.items() if k not in ("id", "object", "created")},
        }
        return f"data: {dumps(ordered)}\n\n"

    async def events(self) -> AsyncIterator[str]:
        """The SSE body. The engine stream is cancelled however this ends (a client disconnect too)."""
        split = ThinkSplitter(self.think)
        buffer = ""
        sentence_id = 0
        pending_tokens = 0  # tokens behind the text not yet sent
        sent_tokens = 0
        failure: GatewayError
        try:
            async for event in self.stream:
                if isinstance(event, TextDelta):
                    pending_tokens += len(event.token_ids)
                    buffer += split.push(event.text)[1]
                    pieces, buffer = split_sentences(buffer)
                    for piece in pieces:
                        sent_tokens += pending_tokens
                        usage = self._usage(pending_tokens, sent_tokens)
                        yield self._chunk(
                            sentence_id, piece, is_end=False, reason="normal", truncated=False, usage=usage
                        )
                        sentence_id += 1
                        pending_tokens = 0
                    continue
                if (found := event.failure()) is not None:
                    raise found  # sent in-band below
                reason, truncated = finish_fields(event, self.client_stops)
                total = event.usage.completion_tokens
                usage = self._usage(max(0, total - sent_tokens), max(total, sent_tokens))
                yield self._chunk(
                    sentence_id, buffer, is_end=True, reason=reason, truncated=truncated, usage=usage
                )
                return
            else:
                # An engine stream always ends with a Finish; should one not, the client still hears why.
                failure = GenerationFailed("the generation ended without finishing")
        except GatewayError as exc:
            failure = exc
        finally:
            self.stream.cancel()
        if buffer:
            # The text generated before the failure still reaches the client, then the error.
            usage = self._usage(pending_tokens, sent_tokens + pending_tokens)
            yield self._chunk(
                sentence_id, buffer, is_end=False, reason="normal", truncated=False, usage=usage
            )
        yield f"data: {error_json(failure)}\n\n"
