"""The Task API's task model: ids and kinds, generation parameters, a `Task` and the `Run` it may be in.

A task is a resumable generation. Its state is an immutable engine snapshot plus `pending` tokens the
snapshot does not hold yet (only after a stop mid-generation: the engine returns no state for a
cancelled request, so the generated tokens are fed on top of the last snapshot the next time the
task runs). Forks and templates copy that pair: snapshots are immutable (the engine copies a
snapshot into fresh tensors whenever a sequence starts from it), so sharing one is copy-on-write and
no two tasks ever share mutable tensors.

Temporary tasks (`TMP_`) live in RAM only; persistent tasks (`TASK_`) and templates (`_TMPL_`) are
also kept in storage (`registry.py`). `runner.py` drives the runs, `service.py` holds the use
cases the routes call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

from rwkv_gateway.domain.engine import TextCodec, TokenStream
from rwkv_gateway.domain.task_store import StoredTask
from rwkv_gateway.domain.types import SamplingParams, Snapshot
from rwkv_gateway.errors import GatewayError, NotFound

_ID_RE = re.compile(r"(?:TMP_|TASK_|_TMPL_)[0-9a-f]{32}")
_SEED_MOD = 2**32


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


@dataclass(frozen=True, slots=True)
class TaskConfig:
    """The registry's limits and the runner's request size (`app.py` fills them from the settings)."""

    tmp_idle_s: float = 600.0
    tmp_max: int = 1024
    cache_size: int = 256
    sweep_s: float = 30.0
    #: The engine's largest max_tokens per request; longer runs chain requests.
    max_segment_tokens: int = 4096


@dataclass(eq=False)
class Run:
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
        self.run: Run | None = None
        self.runner: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()
        self.save_lock = asyncio.Lock()
        #: The snapshot last written to the state store (to skip rewriting an unchanged one).
        self.saved_state: Snapshot | None = None
        #: What this process last wrote to (or read from) storage for the task, to notice another
        #: replica's writes (`TaskRegistry.get`); None until the row has been written once.
        self.saved_row: StoredTask | None = None
        self._changed = asyncio.Event()

    @classmethod
    def new(
        cls, kind: TaskKind, params: GenParams, state: Snapshot | None = None, pending: Sequence[int] = ()
    ) -> Task:
        """A task with a fresh id of its kind."""
        return cls(kind.prefix + uuid.uuid4().hex, kind, params, state, pending)

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
    """The tasks in RAM and in storage (`GET /v1/tasks/list`)."""

    cpu_tasks: list[str]
    database_count: int
    db_tasks: list[str]
    total_count: int
