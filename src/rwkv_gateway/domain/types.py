"""Plain domain types shared by every layer: sampling knobs, generation requests and their events.

Nothing here imports a framework. Dialects translate their wire fields into these; the engine
consumes them and produces `TextDelta` / `Finish` events; services log `RequestRecord`s.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, Protocol, runtime_checkable

from rwkv_gateway.domain.constraints import OutputConstraint
from rwkv_gateway.errors import GatewayError, GenerationFailed, InvalidParameter, NotReady


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    ERROR = "error"


def _finite(name: str, value: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidParameter(f"{name} must be a finite number, got {value!r}", param=name)


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `top_k=True` is a client bug, not a number.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Every sampling knob any dialect exposes. Dialects map their own names and defaults onto these.

    temperature <= 0 means greedy. top_p 1 and top_k 0 disable those filters. Mirostat v2 is on when
    `mirostat_tau` is set (it then replaces top_p/top_k/min_p). Penalties follow the RWKV convention:
    presence/frequency are subtracted from logits of tokens already generated and decay by
    `penalty_decay` each step; `repetition_penalty` divides positive logits (and multiplies negative
    ones) of tokens already seen, as Baidu's `penalty_score` and role-play `presence_penalty` do.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    mirostat_tau: float | None = None
    mirostat_eta: float = 0.1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_decay: float = 1.0
    repetition_penalty: float = 1.0
    #: Count prompt tokens as "seen" for the multiplicative repetition penalty.
    penalize_prompt: bool = False
    banned_tokens: frozenset[int] = frozenset()
    #: Ban the token just consumed (the prompt's last, then each generated one) when it is one of these
    #: (the role-play sampler's AVOID_REPEAT punctuation).
    avoid_repeat_tokens: frozenset[int] = frozenset()
    #: The token consumed right before this request's prompt, for `avoid_repeat_tokens` when the prompt
    #: is empty (generation resumes from a snapshot's logits).
    preceding_token: int | None = None
    #: Filters (Mirostat, top-k, top-p, min-p) select on the temperature-1 distribution; temperature
    #: then reshapes the survivors (w = q ** (1 / T)) instead of scaling logits first.
    temperature_last: bool = False
    #: "llama": llama.cpp's Mirostat v2 (replaces the other filters; mu learns from the chosen token's
    #: probability after truncation). "rwkv": the RWKV role-play sampler's: min-p still applies after
    #: the truncation and mu learns from the chosen token's untruncated probability.
    mirostat_variant: Literal["llama", "rwkv"] = "llama"
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidParameter naming the first bad field."""
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "mirostat_eta",
            "presence_penalty",
            "frequency_penalty",
            "penalty_decay",
            "repetition_penalty",
        ):
            _finite(name, getattr(self, name))
        if self.mirostat_tau is not None:
            _finite("mirostat_tau", self.mirostat_tau)
            if self.mirostat_tau <= 0:
                raise InvalidParameter("mirostat_tau must be > 0", param="mirostat_tau")
            if self.mirostat_eta <= 0:
                raise InvalidParameter("mirostat_eta must be > 0", param="mirostat_eta")
        if not 0.0 <= self.top_p <= 1.0:
            raise InvalidParameter(f"top_p must be in [0, 1], got {self.top_p}", param="top_p")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidParameter(f"min_p must be in [0, 1], got {self.min_p}", param="min_p")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidParameter(f"top_k must be an integer >= 0, got {self.top_k!r}", param="top_k")
        if self.repetition_penalty <= 0:
            raise InvalidParameter("repetition_penalty must be > 0", param="repetition_penalty")
        if not 0.0 <= self.penalty_decay <= 1.0:
            raise InvalidParameter("penalty_decay must be in [0, 1]", param="penalty_decay")
        for tok in self.banned_tokens:
            if not _is_int(tok) or tok < 0 or (vocab_size is not None and tok >= vocab_size):
                raise InvalidParameter(f"banned token {tok!r} is not a token id", param="banned_tokens")
        for tok in self.avoid_repeat_tokens:
            if not _is_int(tok) or tok < 0 or (vocab_size is not None and tok >= vocab_size):
                raise InvalidParameter(f"token {tok!r} is not a token id", param="avoid_repeat_tokens")
        prev = self.preceding_token
        if prev is not None and (
            not _is_int(prev) or prev < 0 or (vocab_size is not None and prev >= vocab_size)
        ):
            raise InvalidParameter(f"token {prev!r} is not a token id", param="preceding_token")
        if self.mirostat_variant not in ("llama", "rwkv"):
            raise InvalidParameter("mirostat_variant must be 'llama' or 'rwkv'", param="mirostat_variant")
        for tok, bias in self.logit_bias.items():
            if not _is_int(tok) or tok < 0 or (vocab_size is not None and tok >= vocab_size):
                raise InvalidParameter(f"logit_bias key {tok!r} is not a token id", param="logit_bias")
            _finite("logit_bias", bias)
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidParameter("seed must be an integer", param="seed")


@runtime_checkable
class Snapshot(Protocol):
    """An immutable RNN state snapshot held by the engine (opaque above the engine)."""

    @property
    def token_count(self) -> int: ...

    @property
    def nbytes(self) -> int: ...


@dataclass(slots=True)
class GenerationRequest:
    """One generation: a prompt (text or token ids) continued from an optional snapshot."""

    prompt: str | None = None
    prompt_tokens: list[int] | None = None
    #: The prompt as message-sized pieces (e.g. one per chat turn), tokenized one by one so that a
    #: conversation's token sequence only ever grows at the end; each piece's end is a checkpoint of
    #: the prefix cache. Replaces `prompt` when given.
    prompt_segments: tuple[str, ...] | None = None
    #: Reuse and extend the engine's prefix cache (only for requests without `initial_state`).
    use_prefix_cache: bool = True
    #: How the reply will come back as the next turn's segment (e.g. `lambda r: f" {r}\n\n"`), or
    #: segments; the engine then prefills that after the reply is sent, so the next turn prefills
    #: only its new text.
    reply_followup: Callable[[str], str | tuple[str, ...]] | None = None
    #: How many of `prompt_segments`' last pieces the follow-up replaces: 0 continues from the end of
    #: the prompt; 1 when the prompt's last piece opens a think block the next turn's history will not
    #: carry (docs/chat-prompts.md#7-resent-history-after-thinking).
    reply_followup_replaces: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    #: Keep the output inside a grammar (structured output, tool calls); see domain/constraints.py.
    constraint: OutputConstraint | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    #: End on the tokenizer's end-of-text token (id 0 in the World vocabulary).
    stop_on_eos: bool = True
    initial_state: Snapshot | None = None
    #: Ask for the final state snapshot in `Finish.state`.
    return_state: bool = False
    #: Ask for the text's embedding in `Finish.embedding` (see `Engine.embed`).
    return_embedding: bool = False
    timeout_s: float | None = None
    dialect: str = "internal"
    user: str | None = None
    api_key_id: str | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True, slots=True)
class Usage:
    #: Tokens of the prompt text (including those served from the prefix cache).
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Prompt tokens not prefilled because a cached state already held them.
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New text (always whole characters) and the token ids sampled since the previous delta (a
    character split over several tokens comes with all of them; text a stop string swallowed leaves
    its tokens to the next delta)."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Finish:
    """The last event of every stream."""

    reason: FinishReason
    usage: Usage
    state: Snapshot | None = None
    error: str | None = None
    #: The stop string or stop token id that ended the sequence, if any.
    stop_matched: str | int | None = None
    #: L2-normalised embedding of everything fed, when the request asked for it.
    embedding: tuple[float, ...] | None = None

    def failure(self) -> GatewayError | None:
        """Why the stream gave no complete reply, as the domain error every dialect renders in its own
        envelope (a status before the first byte, its in-band error after it); None for a reply."""
        if (entry := _FAILURES.get(self.reason)) is None:
            return None
        error_class, default_message = entry
        return error_class(self.error or default_message)


#: The finishes that are failures and the domain error each becomes (one table for every dialect).
#: A timeout is absent on purpose: it ends the reply like the token limit does
#: (docs/chat-prompts.md#4-finish-reasons).
_FAILURES: Mapping[FinishReason, tuple[Callable[[str], GatewayError], str]] = {
    FinishReason.ERROR: (GenerationFailed, "generation failed"),
    # The engine ends streams as cancelled only when their reader cancelled them (nobody is left to
    # tell) or when the server shuts down past its drain deadline ("server shutting down"): the client
    # is still there and hears "not ready", which every dialect marks as worth retrying
    # (docs/operations.md#shutdown-overload-and-faults).
    FinishReason.CANCELLED: (NotReady, "the request was cancelled"),
}


TokenEvent = TextDelta | Finish


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What the request log keeps about one finished generation."""

    request_id: str
    dialect: str
    user: str | None
    api_key_id: str | None
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    total_ms: float
    finish_reason: str
    created_at: float = field(default_factory=time.time)
