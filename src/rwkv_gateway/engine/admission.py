"""Admission: the engine's limits (`EngineConfig`) and turning a `GenerationRequest` into a sequence.

`prepare` checks a request's sampling knobs and token limits, tokenizes its prompt off the event loop
(a chat prompt's segments also give the prefix cache its checkpoint boundaries) and builds the
`GenerationSequence` the scheduler will run; every error it raises comes before anything is queued,
so a dialect can answer with a real status (see docs/architecture.md#the-path-of-one-request).
`live_slots` says how many sequences may run at once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from rwkv_gateway.domain.types import GenerationRequest
from rwkv_gateway.engine.prefix_cache import segment_boundaries
from rwkv_gateway.engine.protocol import Backend
from rwkv_gateway.engine.sampler import Sampler
from rwkv_gateway.engine.snapshot import StateSnapshot
from rwkv_gateway.engine.states import StateStore
from rwkv_gateway.engine.stream import GenerationSequence, GenerationStream
from rwkv_gateway.engine.textstream import IncrementalDecoder, StopMatcher
from rwkv_gateway.engine.tokenizer import Tokenizer
from rwkv_gateway.errors import ConfigError, InvalidParameter, PromptTooLong


@dataclass(frozen=True, slots=True)
class EngineConfig:
    queue_size: int = 256
    max_batch_size: int = 32
    prefill_chunk: int = 128
    prefill_budget: int = 512
    request_timeout_s: float = 600.0
    max_prompt_tokens: int = 32768
    max_new_tokens: int = 4096
    #: Reuse cached states of token prefixes (needs a state store).
    prefix_cache: bool = True
    #: Memory for the live states of running sequences (0: no limit beyond max_batch_size). What does
    #: not fit waits in the queue, which keeps its bound.
    live_state_bytes: int = 0
    #: A closing prompt piece shorter than this gets no prefix-cache checkpoint before it.
    min_checkpoint_gap: int = 16
    #: Prompt chunks run before decoding rows for at most this long at a time (0: always together).
    prefill_priority_s: float = 0.5
    #: Intra-op threads of the model thread (None: torch's default, one per core).
    torch_threads: int | None = None
    #: Threads that sample a step's rows besides the model thread (None: torch_threads - 1).
    sample_threads: int | None = None


def live_slots(config: EngineConfig, backend: Backend) -> int:
    """Sequences that may run at once: the batch size, or fewer if their states would not fit."""
    per_state = int(getattr(backend, "state_nbytes", 0))
    if config.live_state_bytes <= 0 or per_state <= 0:
        return config.max_batch_size
    # A step holds each running state and the new state it computes.
    fits = config.live_state_bytes // (2 * per_state)
    if fits < 1:
        raise ConfigError(
            f"live state budget of {config.live_state_bytes} bytes holds no sequence "
            f"(each needs {2 * per_state} bytes)"
        )
    return min(config.max_batch_size, fits)


async def prepare(
    request: GenerationRequest,
    cfg: EngineConfig,
    backend: Backend,
    tokenizer: Tokenizer,
    states: StateStore | None,
) -> GenerationSequence:
    """Validate and tokenize one request (raises InvalidParameter before anything is queued)."""
    request.sampling.validate(backend.info.vocab_size)
    if not isinstance(request.max_tokens, int) or request.max_tokens < 0:
        raise InvalidParameter("max_tokens must be an integer >= 0", param="max_tokens")
    if request.max_tokens > cfg.max_new_tokens:
        raise InvalidParameter(
            f"max_tokens must be <= {cfg.max_new_tokens}, got {request.max_tokens}", param="max_tokens"
        )
    if request.timeout_s is not None and not request.timeout_s > 0:
        raise InvalidParameter("timeout must be > 0", param="timeout")
    replaces = request.reply_followup_replaces
    if not isinstance(replaces, int) or isinstance(replaces, bool) or replaces < 0:
        raise InvalidParameter(
            "reply_followup_replaces must be an integer >= 0", param="reply_followup_replaces"
        )
    boundaries: tuple[int, ...] = ()
    followup_base: int | None = None
    if request.prompt_segments is not None:
        pieces = await asyncio.to_thread(lambda: [tokenizer.encode(p) for p in request.prompt_segments or ()])
        tokens = [t for piece in pieces for t in piece]
        boundaries = segment_boundaries(pieces, cfg.min_checkpoint_gap)
        if request.reply_followup is not None and 0 < replaces < len(pieces):
            # The follow-up continues from the end of an earlier piece: that state must be captured.
            followup_base = len(tokens) - sum(len(p) for p in pieces[-replaces:])
            boundaries = tuple(sorted({*boundaries, followup_base} - {0}))
    elif request.prompt_tokens is not None:
        tokens = list(request.prompt_tokens)
        vocab = backend.info.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in tokens):
            raise InvalidParameter("prompt token ids must be integers in the vocabulary", param="prompt")
    elif request.prompt:
        tokens = await asyncio.to_thread(tokenizer.encode, request.prompt)
    else:
        tokens = []
    if len(tokens) > cfg.max_prompt_tokens:
        raise PromptTooLong(
            f"the prompt has {len(tokens)} tokens; the limit is {cfg.max_prompt_tokens}", param="prompt"
        )
    snap = request.initial_state
    if snap is not None:
        if not isinstance(snap, StateSnapshot):
            raise InvalidParameter("initial_state is not a state snapshot", param="initial_state")
        snap.check_model(backend.info.model_id)
        if not tokens and snap.logits is None:
            raise InvalidParameter("an empty prompt needs a snapshot that kept its logits", param="prompt")
    elif not tokens:
        raise InvalidParameter("the prompt is empty", param="prompt")
    now = time.monotonic()
    return GenerationSequence(
        stream=GenerationStream(request, len(tokens)),
        pending=tokens,
        state=None,
        sampler=Sampler(request.sampling, backend.info.vocab_size, prompt_tokens=tokens),
        decoder=IncrementalDecoder(tokenizer),
        stopper=StopMatcher(request.stop),
        deadline=now + (request.timeout_s or cfg.request_timeout_s),
        admitted_at=now,
        token_count=snap.token_count if snap is not None else 0,
        logits=snap.logits if snap is not None and not tokens else None,
        prompt=list(tokens),
        boundaries=boundaries or ((len(tokens),) if tokens else ()),
        followup_base=len(tokens) if followup_base is None else followup_base,
        cache_on=bool(cfg.prefix_cache and states is not None and request.use_prefix_cache and snap is None),
    )
