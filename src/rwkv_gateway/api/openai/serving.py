"""OpenAI serving logic: wire requests -> engine requests -> OpenAI responses and SSE chunks.

Requests are admitted (`engine.submit`) before a response object exists, so a full queue or a bad
value is a real HTTP status; after the first byte, failures travel in-band as one `data: {"error":..}`
event followed by `data: [DONE]`. With `n > 1` the prompt is prefilled once and the n choices are
sampled from copies of that state. Every stream ends with `[DONE]`, and a stream whose client goes
away cancels its engine sequences.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from rwkv_gateway.api.openai.errors import stream_error_event
from rwkv_gateway.api.openai.schemas import (
    CompletionRequest,
    EmbeddingRequest,
    SamplingFields,
)
from rwkv_gateway.api.openai.structured import output_constraint
from rwkv_gateway.domain.engine import Engine, ModelInfo, TokenStream
from rwkv_gateway.domain.prompts import chat_template
from rwkv_gateway.domain.types import Finish, FinishReason, GenerationRequest, SamplingParams, TextDelta
from rwkv_gateway.errors import GatewayError, GenerationFailed, InvalidParameter, ModelNotFound
from rwkv_gateway.settings import Settings

FINGERPRINT = "fp_rwkv"
DONE = "[DONE]"


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def model_id(info: ModelInfo) -> str:
    return info.name


def check_model(requested: str | None, info: ModelInfo) -> str:
    """The served model's id; a request naming another model is a 404 (an omitted model is fine)."""
    served = model_id(info)
    if requested is not None and requested != served:
        raise ModelNotFound(
            f"The model '{requested}' does not exist. This server serves '{served}'.", param="model"
        )
    return served


def model_card(info: ModelInfo, created: int, settings: Settings) -> dict[str, Any]:
    # `chat_template` is ours (not in OpenAI's model object): which prompt format, and so which think
    # modes, chat requests get (docs/openai.md).
    return {
        "id": model_id(info),
        "object": "model",
        "created": created,
        "owned_by": "rwkv",
        "chat_template": chat_template(settings, info).name,
    }


def sampling_params(req: SamplingFields, vocab_size: int) -> SamplingParams:
    """OpenAI knobs -> the engine's sampler (OpenAI defaults: temperature 1, top_p 1, no penalties)."""
    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        token = int(key)
        if not 0 <= token < vocab_size:
            raise InvalidParameter(f"logit_bias key {key} is not a token id", param="logit_bias")
        bias[token] = value
    mirostat_tau = None
    if req.mirostat_mode or (req.mirostat_mode is None and req.mirostat_tau is not None):
        # Mirostat v1 and v2 are both served by v2 (the only variant the sampler implements).
        mirostat_tau = req.mirostat_tau if req.mirostat_tau is not None else 5.0
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        mirostat_tau=mirostat_tau,
        mirostat_eta=req.mirostat_eta if req.mirostat_eta is not None else 0.1,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        penalty_decay=1.0 if req.penalty_decay is None else req.penalty_decay,
        repetition_penalty=req.repetition_penalty or 1.0,
        # HF-style repetition penalty (what SillyTavern users expect) covers the prompt too.
        penalize_prompt=req.repetition_penalty is not None,
        logit_bias=bias,
        seed=req.seed,
    )


def check_max_tokens(value: int, settings: Settings, param: str) -> int:
    if value > settings.max_new_tokens:
        raise InvalidParameter(f"{param} must be at most {settings.max_new_tokens}, got {value}", param=param)
    return value


def finish_reason(finish: Finish, called: bool = False) -> str:
    """ "stop", "tool_calls" (a complete reply that made calls) or "length"."""
    # A timeout is a server-side length limit; cancelled streams are never reported to anyone.
    if finish.reason is not FinishReason.STOP:
        return "length"
    return "tool_calls" if called else "stop"


@dataclass(slots=True)
class Admitted:
    """The engine streams of one request's choices, admitted before any response starts."""

    streams: list[TokenStream]
    prompt_tokens: int
    #: Prompt tokens a shared prefill (n > 1) took from the prefix cache.
    cached_tokens: int = 0

    def cancel(self) -> None:
        for stream in self.streams:
            stream.cancel()


async def admit(engine: Engine, base: GenerationRequest, n: int) -> Admitted:
    """Submit the choices. n > 1: prefill once, then sample each choice from a copy of that state."""
    if n == 1:
        stream = await engine.submit(base)
        return Admitted([stream], stream.prompt_token_count)
    prefill = await engine.submit(replace(base, max_tokens=0, return_state=True, stop=()))
    _, finish = await prefill.collect()
    if finish.state is None:
        raise GenerationFailed(finish.error or "prefilling the prompt failed")
    choices = [
        replace(
            base,
            prompt=None,
            prompt_tokens=None,
            prompt_segments=None,
            initial_state=finish.state,
            sampling=replace(
                base.sampling, seed=None if base.sampling.seed is None else base.sampling.seed + i
            ),
            request_id=f"{base.request_id}-{i}",
        )
        for i in range(n)
    ]
    return Admitted(await engine.submit_many(choices), prefill.prompt_token_count, finish.usage.cached_tokens)


async def merged(streams: Sequence[TokenStream]) -> AsyncIterator[tuple[int, TextDelta | Finish]]:
    """Events of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, TextDelta | Finish]] = asyncio.Queue()

    async def pump(index: int, stream: TokenStream) -> None:
        async for event in stream:
            await queue.put((index, event))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, event = await queue.get()
            if isinstance(event, Finish):
                remaining -= 1
            yield index, event
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.cancel()


def text_or_token_inputs(raw: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """OpenAI's prompt/input union (a text, texts, a token list, token lists) as a list of inputs."""
    if isinstance(raw, str):
        return [raw]
    ints = [x for x in raw if isinstance(x, int)]
    if raw and len(ints) == len(raw):
        return [ints]
    out: list[str | list[int]] = []
    for item in raw:
        if isinstance(item, int):
            raise InvalidParameter("mixed token ids and texts in one list", param="prompt")
        out.append(item)
    return out


def usage_dict(
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    reasoning_tokens: int | None = None,
) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        # Prompt tokens served from the prefix cache (not prefilled again), as OpenAI reports them.
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
    if reasoning_tokens is not None:  # chat completions: the think block's share of the completion
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


async def collect_all(
    admitted: Admitted, on_delta: Callable[[int, TextDelta], object] | None = None
) -> tuple[list[str], list[Finish]]:
    texts = [""] * len(admitted.streams)
    finishes: list[Finish | None] = [None] * len(admitted.streams)
    async for index, event in merged(admitted.streams):
        if isinstance(event, TextDelta):
            texts[index] += event.text
            if on_delta is not None:
                on_delta(index, event)
        else:
            finishes[index] = event
    done = [f for f in finishes if f is not None]
    for finish in done:
        if (failure := finish.failure()) is not None:
            raise failure
    return texts, done


# ---------------------------------------------------------------------------- completions


class Completion:
    """What chat and text completions share: ids, the response envelope and the SSE stream loop.

    Subclasses say how one choice looks whole (`_choice`), opened (`_opening`), as a text delta
    (`_delta`) and closed (`_closing`).
    """

    object_name: ClassVar[str]
    chunk_object: ClassVar[str]
    id_prefix: ClassVar[str]

    def __init__(self, engine: Engine, settings: Settings, req: SamplingFields) -> None:
        self.engine = engine
        self.settings = settings
        self.fields = req
        self.model = check_model(req.model, engine.info)
        self.id = f"{self.id_prefix}-{secrets.token_hex(12)}"
        self.created = int(time.time())

    def _choice(self, index: int, text: str, finish: Finish) -> dict[str, Any]:
        raise NotImplementedError

    def _opening(self, index: int) -> dict[str, Any] | None:
        raise NotImplementedError

    def _delta(self, index: int, delta: TextDelta) -> dict[str, Any] | None:
        raise NotImplementedError

    def _closing(self, index: int, finish: Finish) -> list[dict[str, Any]]:
        """The last chunks of a choice: any text still held, then its finish_reason."""
        raise NotImplementedError

    def _absorb(self, index: int, delta: TextDelta) -> None:
        """A delta of a non-streamed choice, seen as it arrives (for what depends on chunk order)."""

    def _reasoning_tokens(self) -> int | None:
        return None

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        }

    @property
    def _include_usage(self) -> bool:
        return self.fields.stream_options is not None and self.fields.stream_options.include_usage

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body = self._envelope(self.chunk_object, choices)
        if self._include_usage:
            body["usage"] = usage  # null on every chunk but the last, as the SDKs expect
        return dumps(body)

    async def response(self, admitted: Admitted) -> dict[str, Any]:
        texts, finishes = await collect_all(admitted, self._absorb)
        choices = [self._choice(i, t, f) for i, (t, f) in enumerate(zip(texts, finishes, strict=True))]
        body = self._envelope(self.object_name, choices)
        completion = sum(f.usage.completion_tokens for f in finishes)
        cached = admitted.cached_tokens + sum(f.usage.cached_tokens for f in finishes)
        body["usage"] = usage_dict(admitted.prompt_tokens, completion, cached, self._reasoning_tokens())
        return body

    async def events(self, admitted: Admitted) -> AsyncIterator[str]:
        completion = 0
        cached = admitted.cached_tokens
        try:
            for i in range(len(admitted.streams)):
                if (opening := self._opening(i)) is not None:
                    yield self._chunk([opening])
            async for i, event in merged(admitted.streams):
                if isinstance(event, TextDelta):
                    if (delta := self._delta(i, event)) is not None:
                        yield self._chunk([delta])
                    continue
                if (failure := event.failure()) is not None:
                    raise failure  # sent in-band below
                completion += event.usage.completion_tokens
                cached += event.usage.cached_tokens
                for closing in self._closing(i, event):
                    yield self._chunk([closing])
            if self._include_usage:
                usage = usage_dict(admitted.prompt_tokens, completion, cached, self._reasoning_tokens())
                yield self._chunk([], usage)
            yield DONE
        except GatewayError as exc:
            yield stream_error_event(exc)
            yield DONE
        finally:
            admitted.cancel()


class TextCompletion(Completion):
    object_name = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, engine: Engine, settings: Settings, req: CompletionRequest) -> None:
        super().__init__(engine, settings, req)
        self.req = req
        if req.suffix:
            raise InvalidParameter(
                "suffix (fill-in-the-middle) is not supported by /v1/completions", param="suffix"
            )
        if req.best_of is not None and req.best_of != req.n:
            raise InvalidParameter("best_of is not supported (use n)", param="best_of")
        self.constraint = output_constraint(req)
        self.prompts = text_or_token_inputs(req.prompt)
        if not self.prompts:
            raise InvalidParameter("prompt must not be empty", param="prompt")

    def engine_request(self, prompt: str | list[int]) -> GenerationRequest:
        req = self.req
        max_tokens = check_max_tokens(
            16 if req.max_tokens is None else req.max_tokens, self.settings, "max_tokens"
        )
        text_prompt = prompt if isinstance(prompt, str) else None
        if text_prompt == "":
            raise InvalidParameter("prompt must not be empty", param="prompt")
        return GenerationRequest(
            prompt=text_prompt,
            prompt_tokens=None if isinstance(prompt, str) else prompt,
            sampling=sampling_params(req, self.engine.info.vocab_size),
            constraint=self.constraint,
            max_tokens=max_tokens,
            stop=tuple(req.stop_list()),
            dialect="openai",
            user=req.user,
        )

    async def admit(self, api_key_id: str | None) -> Admitted:
        """All prompts x n choices, flattened in OpenAI's choice order (prompt-major)."""
        bases = [self.engine_request(prompt) for prompt in self.prompts]
        for base in bases:
            base.api_key_id = api_key_id
        if self.req.n == 1:
            streams = await self.engine.submit_many(bases)
            return Admitted(streams, sum(s.prompt_token_count for s in streams))
        groups: list[Admitted] = []
        try:
            for base in bases:
                groups.append(await admit(self.engine, base, self.req.n))
        except BaseException:
            for group in groups:
                group.cancel()
            raise
        return Admitted([s for g in groups for s in g.streams], sum(g.prompt_tokens for g in groups))

    def _echo(self, index: int) -> str:
        if not self.req.echo:
            return ""
        prompt = self.prompts[index // self.req.n]
        return prompt if isinstance(prompt, str) else self.engine.codec.decode(prompt)

    def _choice(self, index: int, text: str, finish: Finish) -> dict[str, Any]:
        text = self._echo(index) + text
        return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason(finish)}

    def _opening(self, index: int) -> dict[str, Any] | None:
        echo = self._echo(index)
        return {"text": echo, "index": index, "logprobs": None, "finish_reason": None} if echo else None

    def _delta(self, index: int, delta: TextDelta) -> dict[str, Any] | None:
        text = delta.text
        return {"text": text, "index": index, "logprobs": None, "finish_reason": None} if text else None

    def _closing(self, index: int, finish: Finish) -> list[dict[str, Any]]:
        return [{"text": "", "index": index, "logprobs": None, "finish_reason": finish_reason(finish)}]


# ---------------------------------------------------------------------------- embeddings


def encode_vector(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


async def embeddings(engine: Engine, req: EmbeddingRequest) -> dict[str, Any]:
    model = check_model(req.model, engine.info)
    inputs = text_or_token_inputs(req.input)
    if not inputs or any(len(x) == 0 for x in inputs):
        raise InvalidParameter("input must be a non-empty string or list of non-empty strings", param="input")
    if len(inputs) > 2048:
        raise InvalidParameter("at most 2048 inputs per request", param="input")
    results = await engine.embed(inputs)
    data = []
    prompt_tokens = 0
    for index, (vector, tokens) in enumerate(results):
        if req.dimensions is not None:
            if req.dimensions > len(vector):
                raise InvalidParameter(
                    f"dimensions must be at most {len(vector)} for this model", param="dimensions"
                )
            vector = _renormalize(vector[: req.dimensions])
        data.append(
            {"object": "embedding", "index": index, "embedding": encode_vector(vector, req.encoding_format)}
        )
        prompt_tokens += tokens
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def _renormalize(vector: list[float]) -> list[float]:
    norm = sum(x * x for x in vector) ** 0.5
    return [x / norm for x in vector] if norm > 0 else vector
