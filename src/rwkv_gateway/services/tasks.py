"""The Task API's use cases: a registry of tasks, each an RNN state plus the text generated on it.

A task is a resumable generation. Its state is an immutable engine snapshot plus `pending` tokens the
snapshot does not hold yet (only after a stop mid-generation: the engine returns no state for a
cancelled request, so the generated tokens are fed on top of the last snapshot the next time the
task runs). Forks and templates copy that pair: snapshots are immutable (the engine copies a
snapshot into fresh tensors whenever a sequence starts from it), so sharing one is copy-on-write and
no two tasks ever share mutable tensors.

Each run is one engine request (`initial_state` = the task's snapshot, `return_state=True`), or a
chain of them when `max_tokens` exceeds the engine's per-request limit. Runs execute in background
asyncio tasks; generated text is appended to the task's piece list and every change wakes the
subscribers (`follow`), so any number of streams can watch one task and resume from any position.

Temporary tasks (`TMP_`) live in RAM only and are evicted when idle or when there are too many.
Persistent tasks (`TASK_`) and templates (`_TMPL_`) are written to the database (metadata and text)
and their snapshots to the state store with `persist=True`, after creation and after every run, so
they survive restarts; only the most recently used of them stay in RAM.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, Protocol

from rwkv_gateway.domain.engine import Engine, TextCodec, TokenStream
from rwkv_gateway.domain.types import (
    Finish,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    Snapshot,
    TextDelta,
    Usage,
)
from rwkv_gateway.errors import Forbidden, GatewayError, InvalidParameter, NotFound, ServerBusy

logger = logging.getLogger(__name__)

_ID_RE = re.compile(r"(?:TMP_|TASK_|_TMPL_)[0-9a-f]{32}")
_SEED_MOD = 2**32
#: How long `stop` waits for the engine to end the generation before answering anyway.
_STOP_WAIT_S = 5.0
#: How long shutdown waits for running tasks to record their state.
_CLOSE_WAIT_S = 10.0


class TaskNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("Task not found")


class TaskOperationError(GatewayError):
    """An operation this task does not allow (e.g. making a template of a template)."""

    code = "bad_request"
    http_status = 400


class TaskConflict(GatewayError):
    """The task is in a state that forbids the operation now (running, or its state was lost)."""

    code = "conflict"
    http_status = 409


class TaskKind(StrEnum):
    TMP = "tmp"
    TASK = "task"
    TEMPLATE = "template"

    @property
    def prefix(self) -> str:
        return {TaskKind.TMP: "TMP_", TaskKind.TASK: "TASK_", TaskKind.TEMPLATE: "_TMPL_"}[self]

    @property
    def persistent(self) -> bool:
        return self is not TaskKind.TMP

    @classmethod
    def of(cls, task_id: str) -> TaskKind:
        for kind in cls:
            if task_id.startswith(kind.prefix):
                return kind
        raise TaskNotFound


class TaskStatus(IntEnum):
    PREFILL = 0
    READY = 1
    RUNNING = 2
    FINISHED = 3


def is_task_id(task_id: str) -> bool:
    return _ID_RE.fullmatch(task_id) is not None


def new_seed() -> int:
    return time.time_ns() % _SEED_MOD


@dataclass(frozen=True, slots=True)
class GenParams:
    """A task's generation parameters (names and meanings: docs/tasks.md#3-request-bodies)."""

    max_tokens: int = 4096
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.3
    presence_penalty: float = 2.0
    repetition_penalty: float = 0.0
    penalty_decay: float = 1.0
    seed: int = 0

    def updated(self, overrides: Mapping[str, Any]) -> GenParams:
        """Given fields replace stored ones; None keeps them."""
        names = {f.name for f in dataclasses.fields(self)}
        changes = {k: v for k, v in overrides.items() if v is not None and k in names}
        return dataclasses.replace(self, **changes)

    def sampling(self, segment: int) -> SamplingParams:
        """Engine sampling knobs. The RWKV penalties map onto the engine's additive presence and
        frequency penalties (`repetition_penalty` is the per-occurrence one); top_k <= 0 disables top-k.
        Each engine request of one run draws from its own seed so chained requests do not repeat."""
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(0, self.top_k),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.repetition_penalty,
            penalty_decay=self.penalty_decay,
            seed=(self.seed + segment) % 2**64,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> GenParams:
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(slots=True)
class StoredTask:
    """What the database keeps of a persistent task (`services.task_db` maps it onto the table)."""

    task_id: str
    kind: str
    params: str
    state_key: str | None
    pending_tokens: list[int]
    result: str
    piece_ends: list[int]
    prefill_time: float
    gen_time: float
    generated_tokens: int
    error: str | None


class TaskRecords(Protocol):
    """Where persistent tasks are kept (the database, through `services.task_db.TaskDatabase`)."""

    async def load(self, task_id: str) -> StoredTask | None: ...

    async def save(self, row: StoredTask) -> None: ...

    async def delete(self, task_id: str) -> None: ...

    async def count(self) -> int: ...

    async def recent_ids(self, limit: int) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class TaskConfig:
    tmp_idle_s: float = 600.0
    tmp_max: int = 1024
    cache_size: int = 256
    sweep_s: float = 30.0
    #: The engine's largest max_tokens per request; longer runs chain requests.
    max_segment_tokens: int = 4096


@dataclass(eq=False)
class _Run:
    """One generation of a task, possibly several engine requests long."""

    #: Snapshot the current engine request started from, and what it fed on top of it.
    base: Snapshot | None
    fed: list[int]
    stream: TokenStream
    max_tokens: int
    segment: int = 0
    #: Generated tokens of earlier (finished) engine requests of this run.
    done_tokens: int = 0
    #: Token ids and texts of the current engine request's deltas.
    ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    stop_requested: bool = False
    api_key_id: str | None = None
    #: When the run was admitted (its prefill time counts from here).
    submitted: float = field(default_factory=time.monotonic)

    def generated_ids(self, codec: TextCodec) -> list[int]:
        """Token ids of the current request's text. Deltas name the token that completed their text;
        when a character took several tokens the earlier ones are not named, and then the text is
        tokenized again (the same text, possibly other token boundaries)."""
        text = "".join(self.texts)
        if codec.decode(self.ids) == text:
            return list(self.ids)
        return codec.encode(text)


class Task:
    """One task. Touched only from the event loop."""

    def __init__(
        self,
        task_id: str,
        kind: TaskKind,
        params: GenParams,
        state: Snapshot | None = None,
        pending: Sequence[int] = (),
    ) -> None:
        self.id = task_id
        self.kind = kind
        self.params = params
        self.state = state
        self.pending = list(pending)
        self.pieces: list[str] = []
        self.status = TaskStatus.FINISHED
        self.prefill_time = 0.0
        self.gen_time = 0.0
        #: Generated tokens behind `pieces` (for `speed`).
        self.generated = 0
        self.error: str | None = None
        #: Bumped when a re-prompt clears the pieces: subscribers of the old text stop there.
        self.epoch = 0
        self.last_used = time.monotonic()
        #: The snapshot named by the database row could not be loaded (another model, deleted file).
        self.state_lost = False
        self.deleted = False
        self.run: _Run | None = None
        self.runner: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()
        self.save_lock = asyncio.Lock()
        #: The snapshot last written to the state store (to skip rewriting an unchanged one).
        self.saved_state: Snapshot | None = None
        self._changed = asyncio.Event()

    @property
    def result(self) -> str:
        return "".join(self.pieces)

    @property
    def finished(self) -> bool:
        return self.status is TaskStatus.FINISHED

    @property
    def speed(self) -> float:
        return self.generated / self.gen_time if self.gen_time > 0 else 0.0

    @property
    def state_key(self) -> str:
        return f"task:{self.id}"

    def changed(self) -> asyncio.Event:
        """An event set at the next change (take it before reading, then wait on it)."""
        return self._changed

    def notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def resume_point(self, codec: TextCodec) -> tuple[Snapshot | None, list[int]]:
        """The task's state right now: a snapshot and the tokens to feed on top of it."""
        run = self.run
        if run is None:
            return self.state, list(self.pending)
        return run.base, [*run.fed, *run.generated_ids(codec)]

    def copy_text(self, other: Task) -> None:
        self.pieces = list(other.pieces)
        self.prefill_time = other.prefill_time
        self.gen_time = other.gen_time
        self.generated = other.generated


@dataclass(frozen=True, slots=True)
class Prefilled:
    """Stream event: the current run's prompt is prefilled (or there was none)."""

    prefill_time: float


@dataclass(frozen=True, slots=True)
class Generated:
    """Stream event: text generated since the last event."""

    text: str
    gen_time: float
    speed: float


@dataclass(frozen=True, slots=True)
class TaskListing:
    cpu_tasks: list[str]
    database_count: int
    db_tasks: list[str]
    total_count: int


class TaskService:
    """The registry of tasks and their runs (one per app, owned by the lifespan)."""

    def __init__(self, records: TaskRecords, config: TaskConfig) -> None:
        self._records = records
        self.config = config
        self._tasks: OrderedDict[str, Task] = OrderedDict()
        self._load_lock = asyncio.Lock()
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="task-sweeper")

    async def aclose(self) -> None:
        """Stop every run and wait (briefly) until each has recorded its state."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        runners = []
        for task in self._tasks.values():
            self.cancel_run(task)
            if task.runner is not None:
                runners.append(task.runner)
        if runners:
            _, late = await asyncio.wait(runners, timeout=_CLOSE_WAIT_S)
            for runner in late:
                runner.cancel()
            if late:
                await asyncio.wait(late)

    # ------------------------------------------------------------------ registry

    def _register(self, task: Task) -> None:
        self._tasks[task.id] = task
        self._tasks.move_to_end(task.id)
        self._evict(keep=task.id)

    def _evict(self, keep: str | None = None) -> None:
        """Drop idle temporary tasks, then the least recently used finished ones over the limits
        (never `keep`, the task a caller is about to use)."""
        now = time.monotonic()
        cfg = self.config
        for task in list(self._tasks.values()):
            idle = now - task.last_used > cfg.tmp_idle_s
            if task.kind is TaskKind.TMP and task.run is None and idle and task.id != keep:
                self._drop(task)
        tmp = [t for t in self._tasks.values() if t.kind is TaskKind.TMP]
        persistent = [t for t in self._tasks.values() if t.kind is not TaskKind.TMP]
        for group, limit in ((tmp, cfg.tmp_max), (persistent, cfg.cache_size)):
            excess = len(group) - limit
            for task in group:  # least recently used first
                if excess <= 0:
                    break
                # Running tasks stay; persistent ones only leave RAM once their row is written.
                if task.run is None and not task.save_lock.locked() and task.id != keep:
                    self._drop(task)
                    excess -= 1

    def _drop(self, task: Task) -> None:
        self._tasks.pop(task.id, None)
        task.notify()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_s)
            self._evict()

    async def get(self, engine: Engine, task_id: str) -> Task:
        """The task (loaded from the database if it left RAM); TaskNotFound otherwise."""
        if not is_task_id(task_id):
            raise TaskNotFound
        task = self._tasks.get(task_id)
        if task is None and TaskKind.of(task_id).persistent:
            async with self._load_lock:
                task = self._tasks.get(task_id)
                if task is None:
                    task = await self._load(engine, task_id)
                    if task is not None:
                        self._register(task)
        if task is None:
            raise TaskNotFound
        if task_id in self._tasks:
            self._tasks.move_to_end(task_id)
        task.touch()
        return task

    async def _load(self, engine: Engine, task_id: str) -> Task | None:
        row = await self._records.load(task_id)
        if row is None:
            return None
        task = _from_row(row)
        if row.state_key is not None:
            store = engine.snapshots
            snap = None
            if store is not None:
                try:
                    snap = await asyncio.to_thread(store.get, row.state_key)
                except GatewayError as exc:
                    logger.warning("state of task %s cannot be used: %s", task_id, exc.message)
            if snap is None:
                logger.warning("the state of task %s is lost; it can be read but not continued", task_id)
                task.state_lost = True
            task.state = task.saved_state = snap
        return task

    # ------------------------------------------------------------------ use cases

    async def create(
        self,
        engine: Engine,
        kind: TaskKind,
        prompt: str | list[int],
        params: GenParams,
        *,
        api_key_id: str | None = None,
    ) -> Task:
        """A new task that generates from `prompt` (admitted before this returns)."""
        task = Task(kind.prefix + uuid.uuid4().hex, kind, params)
        await self._start_run(engine, task, prompt, params, api_key_id=api_key_id)
        self._register(task)
        try:
            if kind.persistent:
                await self._save(engine, task)
        finally:
            self._launch(engine, task)
        return task

    async def fork(
        self,
        engine: Engine,
        task_id: str,
        *,
        tmp: bool,
        prompt: str | list[int] | None,
        overrides: Mapping[str, Any],
        api_key_id: str | None = None,
    ) -> Task:
        """A new task with a copy of the source's state, text and parameters, then continued."""
        source = await self.get(engine, task_id)
        self._check_state(source)
        kind = TaskKind.TMP if tmp else TaskKind.TASK
        state, pending = source.resume_point(engine.codec)
        child = Task(kind.prefix + uuid.uuid4().hex, kind, source.params, state, pending)
        child.copy_text(source)
        params = source.params.updated(overrides)
        await self._start_run(engine, child, prompt, params, api_key_id=api_key_id)
        self._register(child)
        try:
            if kind.persistent:
                await self._save(engine, child)
        finally:
            self._launch(engine, child)
        return child

    async def continue_(
        self,
        engine: Engine,
        task_id: str,
        *,
        prompt: str | list[int] | None,
        overrides: Mapping[str, Any],
        api_key_id: str | None = None,
    ) -> Task:
        """Generate again on the task: after prefilling `prompt` (which clears the text), or, without a
        prompt, resuming from where it stopped with its text kept."""
        task = await self.get(engine, task_id)
        if task.kind is TaskKind.TEMPLATE:
            raise TaskOperationError("Templates cannot be continued; fork them instead")
        self._check_state(task)
        async with task.lock:
            if task.run is not None:
                raise TaskConflict("Task is still running; stop it or wait until it finishes")
            await self._start_run(engine, task, prompt, task.params.updated(overrides), api_key_id=api_key_id)
        try:
            if task.kind.persistent:
                await self._save(engine, task)
        finally:
            self._launch(engine, task)
        return task

    async def stop(self, engine: Engine, task_id: str) -> Task:
        """Stop the task's generation; returns once it has finished (or after a few seconds)."""
        task = await self.get(engine, task_id)
        runner = task.runner
        self.cancel_run(task)
        if runner is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(runner), _STOP_WAIT_S)
        return task

    def cancel_run(self, task: Task) -> None:
        """Ask the engine to end the task's generation (it does so at its next step)."""
        if task.run is not None:
            task.run.stop_requested = True
            task.run.stream.cancel()

    async def as_template(self, engine: Engine, task_id: str) -> Task:
        """Freeze a copy of the task's state and text as a template (the source stays)."""
        source = await self.get(engine, task_id)
        if source.kind is TaskKind.TEMPLATE:
            raise TaskOperationError("Task is already a template")
        self._check_state(source)
        state, pending = source.resume_point(engine.codec)
        template = Task(TaskKind.TEMPLATE.prefix + uuid.uuid4().hex, TaskKind.TEMPLATE, source.params, state)
        template.pending = pending
        template.copy_text(source)
        self._register(template)
        await self._save(engine, template)
        return template

    async def delete(self, engine: Engine, task_id: str, *, force: bool) -> None:
        """Stop the task if it runs, then remove it from RAM, the database and the state store."""
        task = await self.get(engine, task_id)
        if task.kind is TaskKind.TEMPLATE and not force:
            raise Forbidden("Cannot delete template without force=true")
        task.deleted = True
        self.cancel_run(task)
        self._drop(task)
        if task.kind.persistent:
            async with task.save_lock:
                await self._records.delete(task.id)
                if engine.snapshots is not None:
                    await asyncio.to_thread(engine.snapshots.delete, task.state_key)

    async def listing(self, limit: int = 100) -> TaskListing:
        count = await self._records.count()
        recent = await self._records.recent_ids(limit)
        tmp = sum(1 for t in self._tasks.values() if t.kind is TaskKind.TMP)
        return TaskListing(list(self._tasks), count, recent, count + tmp)

    async def follow(self, task: Task, pos: int = 0) -> AsyncIterator[Prefilled | Generated]:
        """The task's output from piece `pos` on: what exists at once, then live until it finishes.

        A `Prefilled` event comes first, as soon as the current run's prompt is in the state. The
        stream ends when the task finishes, or when a re-prompt replaces the text it was reading.
        """
        epoch = task.epoch
        announced = False
        while True:
            changed = task.changed()
            if task.epoch != epoch or task.deleted:
                return
            prefilled = task.status in (TaskStatus.RUNNING, TaskStatus.FINISHED)
            if prefilled and not announced:
                announced = True
                yield Prefilled(task.prefill_time)
            if prefilled and pos < len(task.pieces):
                text = "".join(task.pieces[pos:])
                pos = len(task.pieces)
                task.touch()
                yield Generated(text, task.gen_time, task.speed)
                continue  # look again before waiting: more may have come meanwhile
            if task.finished:
                return
            await changed.wait()

    # ------------------------------------------------------------------ runs

    def _check_state(self, task: Task) -> None:
        if task.state_lost:
            raise TaskConflict("The state of this task was lost (it was made by another model?)")

    async def _start_run(
        self,
        engine: Engine,
        task: Task,
        prompt: str | list[int] | None,
        params: GenParams,
        *,
        api_key_id: str | None,
    ) -> None:
        """Admit the task's next generation (raising before anything changes), then run it."""
        if self._closing:
            raise ServerBusy("the server is shutting down")
        new_tokens: list[int] = []
        if isinstance(prompt, str):
            new_tokens = await asyncio.to_thread(engine.codec.encode, prompt)
        elif prompt is not None:
            new_tokens = list(prompt)
        if prompt is not None and not new_tokens and task.state is None and not task.pending:
            raise InvalidParameter("the prompt is empty", param="prompt")
        state, pending = task.state, task.pending
        feed = [*pending, *new_tokens]
        clear = prompt is not None
        if params.max_tokens == 0 and not feed:
            # Nothing to prefill and nothing to generate: the task is finished as it is.
            self._begin(task, params, clear, TaskStatus.FINISHED)
            task.notify()
            return
        first = min(params.max_tokens, self.config.max_segment_tokens)
        request = self._request(state, feed, first, params, 0, api_key_id)
        stream = await engine.submit(request)
        self._begin(task, params, clear, TaskStatus.PREFILL if feed else TaskStatus.READY)
        run = _Run(base=state, fed=feed, stream=stream, max_tokens=params.max_tokens, api_key_id=api_key_id)
        task.run = run
        task.notify()

    def _launch(self, engine: Engine, task: Task) -> None:
        """Start consuming the admitted run. Callers do this last, with no await before they answer,
        so the answer shows the task as admitted (never already finished) and the row is written."""
        if task.run is not None and task.runner is None:
            if not task.deleted and self._tasks.get(task.id) is not task:
                self._tasks[task.id] = task  # evicted while it was being admitted: a running task stays
            task.runner = asyncio.create_task(self._drive(engine, task, task.run), name=f"task-{task.id}")

    @staticmethod
    def _begin(task: Task, params: GenParams, clear: bool, status: TaskStatus) -> None:
        task.params = params
        task.status = status
        task.error = None
        task.prefill_time = 0.0
        if clear:
            task.pieces = []
            task.gen_time = 0.0
            task.generated = 0
            task.epoch += 1
        task.touch()

    @staticmethod
    def _request(
        state: Snapshot | None,
        feed: list[int],
        max_tokens: int,
        params: GenParams,
        segment: int,
        api_key_id: str | None,
    ) -> GenerationRequest:
        return GenerationRequest(
            prompt_tokens=feed,
            initial_state=state,
            return_state=True,
            sampling=params.sampling(segment),
            max_tokens=max_tokens,
            dialect="tasks",
            api_key_id=api_key_id,
        )

    async def _drive(self, engine: Engine, task: Task, run: _Run) -> None:
        """Consume the run's engine stream(s) into the task; record the outcome when it ends."""
        submitted = run.submitted
        gen_started: float | None = None
        gen_before = task.gen_time
        generated_before = task.generated
        try:
            while True:
                finish: Finish | None = None
                async for event in run.stream:
                    now = time.monotonic()
                    if isinstance(event, Finish):
                        finish = event  # always the last event
                        continue
                    if gen_started is None:
                        gen_started = now
                        task.prefill_time = now - submitted
                        task.status = TaskStatus.RUNNING
                    self._absorb(task, run, event)
                    task.gen_time = gen_before + (now - gen_started)
                    task.touch()
                    task.notify()
                now = time.monotonic()
                if gen_started is None:
                    gen_started = now
                    task.prefill_time = now - submitted
                task.gen_time = gen_before + (now - gen_started)
                if finish is None:  # pragma: no cover - every engine stream ends with a Finish
                    finish = Finish(FinishReason.ERROR, usage=Usage(), error="the stream ended early")
                run.done_tokens += finish.usage.completion_tokens
                task.generated = generated_before + run.done_tokens
                if finish.reason in (FinishReason.STOP, FinishReason.LENGTH) and finish.state is not None:
                    task.state, task.pending = finish.state, []
                    left = run.max_tokens - run.done_tokens
                    more = finish.reason is FinishReason.LENGTH and left > 0 and not run.stop_requested
                    if more and await self._next_segment(engine, task, run, finish.state, left):
                        continue
                else:
                    # Cancelled (stop, delete, shutdown), timed out or failed: the engine kept no state,
                    # so the tokens generated on top of the last snapshot are fed at the next run.
                    task.state, task.pending = run.base, [*run.fed, *run.generated_ids(engine.codec)]
                    if finish.reason is not FinishReason.CANCELLED:
                        task.error = finish.error or f"generation ended: {finish.reason.value}"
                        logger.warning("task %s: %s", task.id, task.error)
                break
        except asyncio.CancelledError:  # shutdown gave up waiting: keep what is known, then stop
            run.stream.cancel()
            task.state, task.pending = run.base, [*run.fed, *run.generated_ids(engine.codec)]
            raise
        except Exception:
            logger.exception("task %s failed", task.id)
            run.stream.cancel()
            task.state, task.pending = run.base, [*run.fed, *run.generated_ids(engine.codec)]
            task.error = "internal error"
        finally:
            task.status = TaskStatus.FINISHED
            task.run = None
            task.runner = None
            task.touch()
            task.notify()
        if task.kind.persistent and not task.deleted:
            await self._save(engine, task)

    @staticmethod
    def _absorb(task: Task, run: _Run, delta: TextDelta) -> None:
        run.ids.extend(delta.token_ids)
        run.texts.append(delta.text)
        task.pieces.append(delta.text)
        task.generated += len(delta.token_ids)

    async def _next_segment(self, engine: Engine, task: Task, run: _Run, state: Snapshot, left: int) -> bool:
        """Chain the next engine request of a run longer than the engine's max_tokens."""
        run.segment += 1
        request = self._request(
            state, [], min(left, self.config.max_segment_tokens), task.params, run.segment, run.api_key_id
        )
        while not run.stop_requested and not self._closing:
            try:
                run.stream = await engine.submit(request)
            except ServerBusy as exc:
                await asyncio.sleep(exc.retry_after)
                continue
            except GatewayError as exc:
                task.error = exc.message
                return False
            run.base, run.fed, run.ids, run.texts = state, [], [], []
            if run.stop_requested:  # stopped while this request was being admitted
                run.stream.cancel()
            return True
        return False

    # ------------------------------------------------------------------ persistence

    async def _save(self, engine: Engine, task: Task) -> None:
        """Write a persistent task's row and (if it changed) its snapshot. Failures are logged: the
        task keeps working from RAM."""
        async with task.save_lock:
            if task.deleted:
                return
            # While a run goes on, the resume point is its start plus what it has fed and generated.
            state, pending = task.resume_point(engine.codec)
            store = engine.snapshots
            key: str | None = None
            try:
                if state is not None and store is not None:
                    key = task.state_key
                    if state is not task.saved_state:
                        await asyncio.to_thread(store.put, key, state, persist=True)
                        task.saved_state = state
                elif state is not None:
                    logger.warning("no state store: the state of task %s will not survive a restart", task.id)
                ends: list[int] = []
                offset = 0
                for piece in task.pieces:
                    offset += len(piece)
                    ends.append(offset)
                row = StoredTask(
                    task_id=task.id,
                    kind=task.kind.value,
                    params=task.params.to_json(),
                    state_key=key,
                    pending_tokens=pending,
                    result=task.result,
                    piece_ends=ends,
                    prefill_time=task.prefill_time,
                    gen_time=task.gen_time,
                    generated_tokens=task.generated,
                    error=task.error,
                )
                await self._records.save(row)
            except Exception:
                logger.exception("saving task %s failed", task.id)
        self._evict()  # the task may leave RAM now that its row is written


def _from_row(row: StoredTask) -> Task:
    task = Task(row.task_id, TaskKind(row.kind), GenParams.from_json(row.params))
    task.pending = list(row.pending_tokens)
    start = 0
    for end in row.piece_ends:
        task.pieces.append(row.result[start:end])
        start = end
    task.prefill_time = row.prefill_time
    task.gen_time = row.gen_time
    task.generated = row.generated_tokens
    task.error = row.error
    # A run interrupted by a restart ended with it: the row holds the state it started from.
    task.status = TaskStatus.FINISHED
    return task
