"""The generation engine: admission queue, one model thread, and a step loop over all active sequences.

`submit()` validates a request, tokenizes it and admits it into a bounded queue (full => ServerBusy,
before any response starts). One scheduler task owns the model: each step it admits waiting requests
into free batch slots, then runs a single model-thread call that advances every active sequence —
a bounded prompt chunk for sequences still prefilling (within a per-step token budget, so a long
prompt never freezes other streams), one token for sequences decoding — samples, decodes and applies
stop rules. The event loop never runs torch; it only moves events to each request's stream.

Admission (`EngineConfig`, validation, tokenizing) lives in `admission.py`, the request's stream and
sequence in `stream.py` (with who may touch a sequence when), the prefix cache in `prefix_cache.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rwkv_gateway.domain.engine import ModelInfo, TokenStream
from rwkv_gateway.domain.types import Finish, FinishReason, GenerationRequest, RequestRecord, TextDelta, Usage
from rwkv_gateway.engine import grammar, prefix_cache
from rwkv_gateway.engine.admission import EngineConfig, live_slots, prepare
from rwkv_gateway.engine.batch_sampler import sample_batch
from rwkv_gateway.engine.protocol import Backend, LiveState, StatesConsumed
from rwkv_gateway.engine.snapshot import StateSnapshot
from rwkv_gateway.engine.states import StateStore
from rwkv_gateway.engine.stream import GenerationSequence, GenerationStream
from rwkv_gateway.engine.threads import default_torch_threads, helper_pool, model_thread
from rwkv_gateway.engine.tokenizer import Tokenizer
from rwkv_gateway.errors import GatewayError, GenerationFailed, NotReady, ServerBusy

__all__ = ["EngineConfig", "GenerationStream", "Scheduler"]

logger = logging.getLogger(__name__)


#: Event-loop turns given to consumers after a step that finished a request (see `_run`).
_HANDOFF_YIELDS = 8

#: Finishes after which a requested final state is captured (not after errors or cancellation).
_STATEFUL_ENDS = (FinishReason.STOP, FinishReason.LENGTH)


class Scheduler:
    """The one engine of the process (implements `engine.protocol.Engine`)."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        config: EngineConfig | None = None,
        *,
        on_finish: Callable[[RequestRecord], None] | None = None,
        states: StateStore | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        """`executor`: the model thread, when the model was loaded on it (`threads.model_thread`)."""
        self.backend = backend
        #: Snapshot cache: the prefix cache's checkpoints, and the states services keep (role-play
        #: nodes, tasks).
        self.states = states
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.on_finish = on_finish
        #: Unbounded: `submit_many` enforces the bound itself (groups are admitted whole).
        self._queue: asyncio.Queue[GenerationSequence] | None = None
        self._active: list[GenerationSequence] = []
        #: Taken from the queue but waiting: for a free slot, or for another sequence's checkpoint.
        self._deferred: list[GenerationSequence] = []
        #: The model thread: the one thread that runs multi-threaded torch ops (engine/threads.py).
        self._executor = executor or model_thread(self.config.torch_threads)
        #: Helpers of the model thread for sampling a step's rows on the other CPU cores.
        if self.config.sample_threads is None:
            self._sample_workers = max(0, (self.config.torch_threads or default_torch_threads()) - 1)
        else:
            self._sample_workers = self.config.sample_threads
        self._sample_pool = helper_pool(self._sample_workers, "rwkv-sample") if self._sample_workers else None
        self.max_active = live_slots(self.config, backend)
        #: Compiled output constraints (structured output, tool calls; engine/grammar.py).
        self.grammars = grammar.Grammars(tokenizer, backend.info.vocab_size)
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        #: When the current stretch of prompt-only steps began (model thread; see `_hold_decode`).
        self._holding_since: float | None = None
        self._wakeup: asyncio.Event | None = None
        self.counters: dict[str, int] = {
            "requests": 0,
            "steps": 0,
            "prompt_tokens": 0,
            "generated_tokens": 0,
            "rejected_busy": 0,
            "errors": 0,
            "cached_tokens": 0,
            "followup_tokens": 0,
            "checkpoints": 0,
            "decode_rows": 0,
            "followups_dropped": 0,
        }
        #: Where the engine's time goes (seconds): model-thread steps, and within them the forwards and
        #: the sampling; `loop` is the time between steps while sequences were active (the event loop
        #: delivering, handing off to consumers and admitting).
        self.timers: dict[str, float] = {"step": 0.0, "forward": 0.0, "sample": 0.0, "loop": 0.0}

    # ------------------------------------------------------------------ lifecycle

    @property
    def info(self) -> ModelInfo:
        return self.backend.info

    @property
    def codec(self) -> Tokenizer:
        return self.tokenizer

    @property
    def snapshots(self) -> StateStore | None:
        return self.states

    async def start(self) -> None:
        if self._task is not None:
            return
        self._queue = asyncio.Queue()
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="rwkv-scheduler")

    async def aclose(self) -> None:
        """Stop admitting, end every waiting and running request as cancelled, stop the thread."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # A step may still be running on the model thread: let it end before touching its sequences.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        if self._sample_pool is not None:
            self._sample_pool.shutdown(wait=False)
        leftovers = list(self._active) + self._deferred
        self._deferred = []
        if self._queue is not None:
            while not self._queue.empty():
                leftovers.append(self._queue.get_nowait())
        for seq in leftovers:
            if not seq.done and seq.followup is None:
                seq.finishing = None
                self._finish(seq, FinishReason.CANCELLED, error="server shutting down")
            self._deliver(seq)
        self._active.clear()

    async def embed(self, inputs: Sequence[str | Sequence[int]]) -> list[tuple[list[float], int]]:
        """Embed several texts at once: each is prefilled (batched with everything else) and its
        final hidden vector returned with its token count."""
        requests = [
            GenerationRequest(
                prompt=item if isinstance(item, str) else None,
                prompt_tokens=None if isinstance(item, str) else list(item),
                max_tokens=0,
                return_embedding=True,
                dialect="embedding",
            )
            for item in inputs
        ]
        streams = await self.submit_many(requests)
        try:
            results: list[tuple[list[float], int]] = []
            for stream in streams:
                _, finish = await stream.collect()
                if finish.embedding is None:
                    raise GenerationFailed(finish.error or "embedding failed")
                results.append((list(finish.embedding), finish.usage.prompt_tokens))
            return results
        finally:
            for stream in streams:
                stream.cancel()

    def stats(self) -> dict[str, Any]:
        return {
            "queue_depth": (self._queue.qsize() if self._queue else 0) + len(self._deferred),
            "active_sequences": len(self._active),
            "max_batch_size": self.config.max_batch_size,
            "max_active": self.max_active,
            **self.counters,
            **{f"{name}_seconds": value for name, value in self.timers.items()},
        }

    # ------------------------------------------------------------------ admission

    async def submit(self, request: GenerationRequest) -> TokenStream:
        return (await self.submit_many([request]))[0]

    async def submit_many(self, requests: Sequence[GenerationRequest]) -> list[TokenStream]:
        """Admit several requests together (the choices of one client request): all or none.

        The queue bound counts waiting sequences, but an idle queue always takes a whole group, so a
        request that fans out (n choices, a list of prompts, many embedding inputs) is never refused
        by an idle server however small its queue.
        """
        if self._queue is None or self._closing:
            raise NotReady("the engine is not running")
        self._check_room(len(requests))
        seqs = [await self._prepare(request) for request in requests]
        self._check_room(len(seqs))  # tokenizing yielded to the loop: look again
        for seq in seqs:
            self._queue.put_nowait(seq)
        self.counters["requests"] += len(seqs)
        assert self._wakeup is not None
        self._wakeup.set()
        return [seq.stream for seq in seqs]

    def _check_room(self, count: int) -> None:
        assert self._queue is not None
        waiting = self._queue.qsize() + len(self._deferred)
        if waiting and waiting + count > self.config.queue_size:
            self.counters["rejected_busy"] += 1
            raise ServerBusy(f"the request queue is full ({waiting} waiting)")

    async def _prepare(self, request: GenerationRequest) -> GenerationSequence:
        """Validate and tokenize one request (raises InvalidParameter before anything is queued)."""
        seq = await prepare(request, self.config, self.backend, self.tokenizer, self.states)
        if request.constraint is not None:
            seq.grammar = await asyncio.to_thread(self.grammars.row, request.constraint)
        return seq

    # ------------------------------------------------------------------ the step loop (event loop side)

    async def _run(self) -> None:
        assert self._queue is not None and self._wakeup is not None
        loop = asyncio.get_running_loop()
        last_step_end: float | None = None
        while True:
            self._admit()
            if not self._active:
                self._wakeup.clear()
                last_step_end = None
                if self._queue.empty():
                    await self._wakeup.wait()
                continue
            started = time.perf_counter()
            if last_step_end is not None:
                self.timers["loop"] += started - last_step_end
            # Sequences admitted with a state that kept its logits (a role-play reply, a continued task)
            # need no forward for their first token: sample it in a step of their own and send it
            # before the batch's next forward, which may be a long prompt chunk.
            fresh = [s for s in self._active if s.state is None and not s.pending and s.logits is not None]
            if fresh and len(fresh) < len(self._active):
                await self._run_step(loop, fresh, first_tokens=True)
            finished = await self._run_step(loop, list(self._active))
            last_step_end = time.perf_counter()
            self.timers["step"] += last_step_end - started
            self._active = [s for s in self._active if not s.done]
            if finished:
                # A finished request is often followed at once by the next one of the same client (a
                # role-play reply after its user turn): let the consumers run and submit it, so it
                # joins the next step instead of waiting one out.
                for _ in range(_HANDOFF_YIELDS):
                    await asyncio.sleep(0)

    async def _run_step(
        self, loop: asyncio.AbstractEventLoop, batch: list[GenerationSequence], *, first_tokens: bool = False
    ) -> bool:
        """One step of `batch` on the model thread, then its events out to the streams; whether a
        sequence finished."""
        try:
            await loop.run_in_executor(self._executor, self._step, batch, first_tokens)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in the step itself: fail this batch, keep serving
            logger.exception("engine step failed")
            for seq in batch:
                if not seq.done:
                    self._finish(seq, FinishReason.ERROR, error="internal engine error")
        self.counters["steps"] += 1
        finished = False
        for seq in batch:
            finished = finished or seq.done
            self._deliver(seq)
        return finished

    def _admit(self) -> None:
        assert self._queue is not None
        if len(self._active) >= self.max_active and (self._deferred or not self._queue.empty()):
            # A reply's follow-up prefill only warms the cache for that client's next turn: it gives
            # its slot to a waiting request (whose next turn then prefills the reply itself).
            for seq in self._active:
                if seq.followup is not None and not seq.done:
                    self._retire(seq)
                    self.counters["followups_dropped"] += 1
            self._active = [s for s in self._active if not s.done]
        waiting, self._deferred = self._deferred, []
        while len(self._active) < self.max_active and not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for seq in waiting:
            if seq.stream.cancelled:
                self._finish(seq, FinishReason.CANCELLED)
                self._deliver(seq)
            elif len(self._active) >= self.max_active or prefix_cache.prefilled_by_another(seq, self._active):
                self._deferred.append(seq)
            else:
                self._active.append(seq)

    def _deliver(self, seq: GenerationSequence) -> None:
        events, seq.events = seq.events, []
        for event in events:
            seq.stream._put(event)
            if isinstance(event, Finish):
                self._record(seq, event)

    def _record(self, seq: GenerationSequence, finish: Finish) -> None:
        if self.on_finish is None:
            return
        try:
            self.on_finish(seq.record(finish))
        except Exception:
            logger.exception("request log hook failed")

    # ------------------------------------------------------------------ one step (model thread)

    def _step(self, batch: list[GenerationSequence], first_tokens: bool = False) -> None:
        """Advance `batch` by one step. `first_tokens`: a step of fresh sequences only (see `_run`),
        which must not end a stretch of prompt-only steps."""
        now = time.monotonic()
        cfg = self.config
        budget = cfg.prefill_budget
        feed: list[tuple[GenerationSequence, list[int]]] = []
        hold_decode = not first_tokens and self._hold_decode(batch, now)
        followups: list[GenerationSequence] = []
        for seq in batch:
            if seq.done:
                continue
            # A follow-up prefill runs after its reply was delivered: nobody is waiting to cancel it.
            if seq.followup is None and seq.stream.cancelled:
                self._finish(seq, FinishReason.CANCELLED)
                continue
            if seq.followup is None and now > seq.deadline:
                self._finish(seq, FinishReason.TIMEOUT, error="the request timed out")
                continue
            if seq.state is None:
                seq.state = self._initial_state(seq)
                if seq.state is None:
                    continue
            if seq.pending and seq.followup is not None:
                followups.append(seq)  # background work: only the budget prompts leave
            elif seq.pending:
                budget = self._take_chunk(seq, budget, feed)
            elif seq.last_token is not None:
                if hold_decode:
                    continue  # prompts go first (see `_hold_decode`)
                feed.append((seq, [seq.last_token]))
                seq.last_token = None
                self.counters["decode_rows"] += 1
            elif seq.logits is None:  # pragma: no cover - admission guarantees tokens or logits
                self._finish(seq, FinishReason.ERROR, error="nothing to generate from")
        for seq in followups:
            budget = self._take_chunk(seq, budget, feed)
        grammar.start_masks(batch, self._sample_pool)  # filled while the forward runs
        if feed:
            t0 = time.perf_counter()
            self._forward(feed)
            self.timers["forward"] += time.perf_counter() - t0
            now = time.monotonic()
        ready: list[GenerationSequence] = []
        for seq in batch:
            if seq.done:
                continue
            if seq.finishing is not None and seq.last_token is None:
                self._complete(seq, seq.finishing)
            elif not seq.pending and seq.last_token is None and seq.logits is not None:
                if seq.generated >= seq.request.max_tokens:
                    self._finish(seq, FinishReason.LENGTH)
                else:
                    ready.append(seq)
        if ready:
            # Every row that needs a token is sampled together (one device-to-host copy on a GPU).
            t0 = time.perf_counter()
            results = sample_batch(
                [s.sampler for s in ready],
                grammar.masked_rows(ready, [s.logits for s in ready if s.logits is not None]),
                pool=self._sample_pool,
                pool_workers=self._sample_workers,
            )
            self.timers["sample"] += time.perf_counter() - t0
            for seq, result in zip(ready, results, strict=True):
                self._take_token(seq, result, now)

    def _take_chunk(
        self, seq: GenerationSequence, budget: int, feed: list[tuple[GenerationSequence, list[int]]]
    ) -> int:
        """Feed `seq` its next prompt chunk within `budget` (the rest waits for a later step)."""
        if budget <= 0:
            return budget
        take = min(self.config.prefill_chunk, budget, len(seq.pending), prefix_cache.to_checkpoint(seq))
        chunk, seq.pending = seq.pending[:take], seq.pending[take:]
        feed.append((seq, chunk))
        return budget - take

    def _hold_decode(self, batch: list[GenerationSequence], now: float) -> bool:
        """Whether this step runs prompt chunks only, leaving decoding rows for a later step.

        A decode forward costs about as much as a prompt chunk of a few dozen tokens on a CPU, so when
        many requests arrive at once, running both in every step makes every new request wait for the
        whole burst's prompts. Prompts therefore go first, for at most `prefill_priority_s` at a time:
        decoding streams pause at most that long, and no longer than the prompts take.
        """
        limit = self.config.prefill_priority_s
        prompts = limit > 0 and any(
            s.pending and s.followup is None and not s.done and not s.stream.cancelled for s in batch
        )
        if not prompts:
            self._holding_since = None
            return False
        if self._holding_since is None:
            self._holding_since = now
        if now - self._holding_since < limit:
            return True
        self._holding_since = None  # decode this step; the next prompt-only stretch starts after it
        return False

    def _initial_state(self, seq: GenerationSequence) -> LiveState | None:
        snap = seq.request.initial_state
        try:
            if snap is None:
                snap = prefix_cache.start_from_cache(self.states, seq, self.counters)
                if snap is None:
                    return self.backend.zero_state()
            assert isinstance(snap, StateSnapshot)
            state = self.backend.restore(snap)
            # Snapshots rest in host memory; the logits a step samples from must be where the model's
            # own are (the last layer's device), or a GPU batch could not sample them together.
            if seq.logits is not None and state and seq.logits.device != state[-1].device:
                seq.logits = seq.logits.to(state[-1].device, non_blocking=True)
            return state
        except GatewayError as exc:
            self._finish(seq, FinishReason.ERROR, error=exc.message)
        except Exception:
            logger.exception("restoring the state of request %s failed", seq.request.request_id)
            self._finish(seq, FinishReason.ERROR, error="could not restore the state")
        return None

    def _forward(self, feed: list[tuple[GenerationSequence, list[int]]]) -> None:
        # Each sequence owns its live state and replaces it with the new one below, so the backend may
        # write the new states over the old ones.
        try:
            logits, states = self.backend.forward(
                [t for _, t in feed], [s.state for s, _ in feed], overwrite=True
            )
        except Exception as exc:
            # Rows whose states the failed call wrote (half-advanced) cannot be fed again, nor can a lone
            # row: they fail. The others were only read: retried one by one, so that one bad request
            # does not fail the whole batch.
            if isinstance(exc, StatesConsumed):
                lost = exc.rows
            else:
                lost = frozenset({0}) if len(feed) == 1 else frozenset()
            for row in sorted(lost):
                seq = feed[row][0]
                logger.exception("model forward failed for request %s", seq.request.request_id)
                self._finish(seq, FinishReason.ERROR, error="model forward failed")
            rest = [item for row, item in enumerate(feed) if row not in lost]
            if rest:
                logger.warning("batched forward failed; retrying %d sequences one by one", len(rest))
            for item in rest:
                self._forward([item])
            return
        for (seq, tokens), row, state in zip(feed, logits, states, strict=True):
            seq.state = state
            seq.logits = row
            seq.token_count += len(tokens)
            if seq.followup is not None:
                self.counters["followup_tokens"] += len(tokens)
                if not seq.pending:
                    self._checkpoint(seq, seq.prompt[: seq.followup_base] + seq.followup)
                    self._retire(seq)
            elif seq.generated == 0:
                seq.pos += len(tokens)
                self.counters["prompt_tokens"] += len(tokens)
                if seq.cache_on and seq.pos in seq.boundaries:
                    snap = self._checkpoint(seq, seq.prompt[: seq.pos])
                    if seq.pos == seq.followup_base and seq.request.reply_followup is not None:
                        seq.prompt_snapshot = snap

    def _take_token(self, seq: GenerationSequence, token: int | Exception, now: float) -> None:
        """A sampled token (or the row's sampling failure): stop rules, text, length."""
        req = seq.request
        if isinstance(token, Exception):
            logger.warning("sampling failed for request %s: %s", req.request_id, token)
            self._finish(seq, FinishReason.ERROR, error=f"sampling failed: {token}")
            return
        seq.generated += 1
        self.counters["generated_tokens"] += 1
        if seq.first_token_at is None:
            seq.first_token_at = now
        eos = self.tokenizer.eos_token_id
        # End of text under a constraint: the grammar allowed it, so the value is complete.
        at_eos = eos is not None and token == eos and (req.stop_on_eos or seq.grammar is not None)
        if token in req.stop_token_ids or at_eos:
            # A stop token ends the sequence unseen and unfed.
            self._finish(seq, FinishReason.STOP, stop_matched=token)
            return
        if seq.grammar is not None and not seq.grammar.accept(token):
            self._finish(seq, FinishReason.ERROR, error=f"output constraint failed: {seq.grammar.error}")
            return
        seq.last_token = token
        seq.unsent_ids.append(token)
        text, matched = seq.stopper.push(seq.decoder.push(token))
        if text:
            # Every token since the last delta: a character split over tokens comes with all of them.
            seq.events.append(TextDelta(text, tuple(seq.unsent_ids)))
            seq.unsent_ids.clear()
            seq.text_parts.append(text)
        if matched is not None:
            self._finish(seq, FinishReason.STOP, stop_matched=matched)
        elif seq.grammar is not None and seq.grammar.done:  # the constrained value is complete
            self._finish(seq, FinishReason.STOP)
        elif seq.generated >= req.max_tokens:
            self._finish(seq, FinishReason.LENGTH)

    # ------------------------------------------------------------------ finishing

    def _finish(
        self,
        seq: GenerationSequence,
        reason: FinishReason,
        *,
        error: str | None = None,
        stop_matched: str | int | None = None,
    ) -> None:
        if seq.followup is not None:  # the reply was already delivered; only its cache entry is lost
            self._retire(seq)
            return
        if reason in (FinishReason.LENGTH, FinishReason.STOP) and not isinstance(stop_matched, str):
            # No stop string matched yet: release what the decoder and the stop matcher still hold
            # (which may itself complete a stop string).
            tail, matched = seq.stopper.push(seq.decoder.flush())
            if matched is None:
                tail += seq.stopper.flush()
            else:
                reason, stop_matched = FinishReason.STOP, matched
            if tail:
                seq.events.append(TextDelta(tail, tuple(seq.unsent_ids)))
                seq.unsent_ids.clear()
                seq.text_parts.append(tail)
        finish = Finish(
            reason=reason,
            usage=Usage(
                prompt_tokens=len(seq.prompt), completion_tokens=seq.generated, cached_tokens=seq.cached
            ),
            error=error,
            stop_matched=stop_matched,
        )
        if reason is FinishReason.ERROR:
            self.counters["errors"] += 1
        wants_state = seq.request.return_state and reason in _STATEFUL_ENDS
        if wants_state and seq.last_token is not None:
            # The returned state covers every emitted token: feed the last one at the next step.
            seq.finishing = finish
            return
        self._complete(seq, finish)

    def _complete(self, seq: GenerationSequence, finish: Finish) -> None:
        if seq.request.return_embedding and seq.state is not None and finish.reason in _STATEFUL_ENDS:
            try:
                finish = dataclasses.replace(finish, embedding=tuple(self.backend.embedding(seq.state)))
            except Exception:
                logger.exception("embedding of request %s failed", seq.request.request_id)
                self.counters["errors"] += 1
                finish = Finish(FinishReason.ERROR, finish.usage, None, "could not compute the embedding")
        if seq.request.return_state and seq.state is not None and finish.reason in _STATEFUL_ENDS:
            try:
                snap = self.backend.capture(seq.state, seq.token_count, seq.logits)
                finish = dataclasses.replace(finish, state=snap)
            except Exception:
                logger.exception("capturing the final state of request %s failed", seq.request.request_id)
                self.counters["errors"] += 1
                finish = Finish(FinishReason.ERROR, finish.usage, None, "could not capture the final state")
        seq.events.append(finish)
        if finish.reason in _STATEFUL_ENDS and prefix_cache.start_followup(seq, self.tokenizer, self.backend):
            return
        self._retire(seq)

    def _retire(self, seq: GenerationSequence) -> None:
        seq.done = True
        seq.state = None
        seq.logits = None
        seq.prompt_snapshot = None

    # ------------------------------------------------------------------ prefix cache (engine/prefix_cache.py)

    def _checkpoint(self, seq: GenerationSequence, tokens: list[int]) -> StateSnapshot | None:
        assert self.states is not None
        return prefix_cache.checkpoint(self.states, self.backend, seq, tokens, self.counters)
