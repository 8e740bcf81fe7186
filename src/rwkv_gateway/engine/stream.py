"""A request in flight: the event stream its consumer reads, and the engine's record of its progress.

`GenerationStream` is what `Scheduler.submit` returns: the event loop puts the request's `TextDelta`
and `Finish` events on it, and the consumer (a dialect's router) iterates it or cancels it.
`GenerationSequence` is the scheduler's side of the same request: its prompt, RNN state, sampler, text
decoders and where it stands. Ownership: a sequence is touched by the model thread only while a step
runs, and by the event loop only between steps; the one exception is the stream's `cancelled` flag,
which the loop may set at any time and the thread only reads (see docs/architecture.md#threads).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from rwkv_gateway.domain.types import Finish, GenerationRequest, RequestRecord, TextDelta, TokenEvent
from rwkv_gateway.engine.protocol import LiveState
from rwkv_gateway.engine.sampler import Sampler
from rwkv_gateway.engine.snapshot import StateSnapshot
from rwkv_gateway.engine.textstream import IncrementalDecoder, StopMatcher

if TYPE_CHECKING:
    from rwkv_gateway.engine.grammar import RowGrammar


class GenerationStream:
    """The events of one request. Iterate it; call `cancel()` when the client goes away."""

    def __init__(self, request: GenerationRequest, prompt_token_count: int) -> None:
        self.request = request
        self.prompt_token_count = prompt_token_count
        self.cancelled = False
        self.finish: Finish | None = None
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()

    def _put(self, event: TokenEvent) -> None:
        if isinstance(event, Finish):
            self.finish = event
        self._queue.put_nowait(event)

    def cancel(self) -> None:
        self.cancelled = True

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        try:
            while True:
                event = await self._queue.get()
                yield event
                if isinstance(event, Finish):
                    return
        finally:
            # A consumer that stops early (client gone, generator closed) cancels the request.
            if self.finish is None:
                self.cancel()

    async def collect(self) -> tuple[str, Finish]:
        """The whole text and the finish event (for non-streaming responses)."""
        parts: list[str] = []
        async for event in self:
            if isinstance(event, TextDelta):
                parts.append(event.text)
            else:
                return "".join(parts), event
        raise RuntimeError("stream ended without a Finish event")  # pragma: no cover


@dataclass(eq=False)
class GenerationSequence:
    stream: GenerationStream
    pending: list[int]
    state: LiveState | None
    sampler: Sampler
    decoder: IncrementalDecoder
    stopper: StopMatcher
    deadline: float
    admitted_at: float
    token_count: int
    #: The whole prompt, and where its segments end (prefix-cache checkpoints).
    prompt: list[int] = field(default_factory=list)
    boundaries: tuple[int, ...] = ()
    #: Take part in the prefix cache (no explicit initial state, cache enabled).
    cache_on: bool = False
    #: Prompt tokens in the state so far, and how many of them came from the cache.
    pos: int = 0
    cached: int = 0
    #: Where the reply follow-up continues from (prompt tokens; the whole prompt unless the request's
    #: `reply_followup_replaces` drops its last pieces), and the state there, kept while a follow-up
    #: may still be prefilled.
    followup_base: int = 0
    prompt_snapshot: StateSnapshot | None = None
    #: After the reply was sent: the follow-up tokens being prefilled for the next turn's cache.
    followup: list[int] | None = None
    text_parts: list[str] = field(default_factory=list)
    #: Logits to sample from next (from the last forward or the initial snapshot), row kept on device.
    logits: torch.Tensor | None = None
    generated: int = 0
    first_token_at: float | None = None
    #: A sampled token not yet fed to the model (the next decode step feeds it).
    last_token: int | None = None
    #: Sampled tokens whose text has not gone out yet (held by the decoder or the stop matcher).
    unsent_ids: list[int] = field(default_factory=list)
    events: list[TokenEvent] = field(default_factory=list)
    done: bool = False
    #: Finished, but the final state must still absorb `last_token` before it is captured.
    finishing: Finish | None = None
    #: The output constraint's matcher (engine/grammar.py), None for an unconstrained request.
    grammar: RowGrammar | None = None

    @property
    def request(self) -> GenerationRequest:
        return self.stream.request

    def record(self, finish: Finish) -> RequestRecord:
        """The request log's entry for this sequence, ending now with `finish`."""
        req = self.request
        now = time.monotonic()
        ttft = None if self.first_token_at is None else (self.first_token_at - self.admitted_at) * 1000
        return RequestRecord(
            request_id=req.request_id,
            dialect=req.dialect,
            user=req.user,
            api_key_id=req.api_key_id,
            prompt_tokens=finish.usage.prompt_tokens,
            completion_tokens=finish.usage.completion_tokens,
            ttft_ms=ttft,
            total_ms=(now - self.admitted_at) * 1000,
            finish_reason=finish.reason.value,
        )
