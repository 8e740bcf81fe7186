"""The Task API's use cases (`TaskService`): create, fork, continue, stop, template, delete, list, follow.

The service combines the registry (which tasks exist, `registry.py`) with the runner (their
generations on the engine, `runner.py`); the routes of `api/tasks/` call only this class. The engine
is passed into each call because the model may still be loading when the service starts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from rwkv_gateway.domain.constraints import OutputConstraint
from rwkv_gateway.domain.engine import Engine
from rwkv_gateway.domain.storage import Storage
from rwkv_gateway.domain.task_store import TaskUnit
from rwkv_gateway.errors import Forbidden
from rwkv_gateway.services.tasks.model import (
    Generated,
    GenParams,
    Prefilled,
    Task,
    TaskConfig,
    TaskConflict,
    TaskKind,
    TaskListing,
    TaskOperationError,
    TaskStatus,
)
from rwkv_gateway.services.tasks.registry import TaskRegistry
from rwkv_gateway.services.tasks.runner import TaskRunner

#: How long `stop` waits for the engine to end the generation before answering anyway.
_STOP_WAIT_S = 5.0


class TaskService:
    """The registry of tasks and their runs (one per app, owned by the lifespan)."""

    def __init__(self, storage: Storage[TaskUnit], config: TaskConfig) -> None:
        self.config = config
        self._registry = TaskRegistry(storage, config)
        self._runner = TaskRunner(self._registry, config)
        self._sweeper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._registry.sweep_forever(), name="task-sweeper")

    async def aclose(self) -> None:
        """Stop every run and wait (briefly) until each has recorded its state."""
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
        await self._runner.close()  # refuses new runs before its first await
        if sweeper is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    # ------------------------------------------------------------------ use cases

    async def get(self, engine: Engine, task_id: str) -> Task:
        """The task (loaded from storage if it left RAM); TaskNotFound otherwise."""
        return await self._registry.get(engine, task_id)

    async def create(
        self,
        engine: Engine,
        kind: TaskKind,
        prompt: str | list[int],
        params: GenParams,
        *,
        api_key_id: str | None = None,
        constraint: OutputConstraint | None = None,
    ) -> Task:
        """A new task that generates from `prompt` (admitted before this returns)."""
        task = Task.new(kind, params)
        await self._start_new(engine, task, prompt, params, api_key_id=api_key_id, constraint=constraint)
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
        constraint: OutputConstraint | None = None,
    ) -> Task:
        """A new task with a copy of the source's state, text and parameters, then continued."""
        source = await self.get(engine, task_id)
        _check_state(source)
        kind = TaskKind.TMP if tmp else TaskKind.TASK
        state, pending = source.resume_point(engine.codec)
        child = Task.new(kind, source.params, state, pending)
        child.copy_text(source)
        params = source.params.updated(overrides)
        await self._start_new(engine, child, prompt, params, api_key_id=api_key_id, constraint=constraint)
        return child

    async def continue_(
        self,
        engine: Engine,
        task_id: str,
        *,
        prompt: str | list[int] | None,
        overrides: Mapping[str, Any],
        api_key_id: str | None = None,
        constraint: OutputConstraint | None = None,
    ) -> Task:
        """Generate again on the task: after prefilling `prompt` (which clears the text), or, without a
        prompt, resuming from where it stopped with its text kept."""
        task = await self.get(engine, task_id)
        if task.kind is TaskKind.TEMPLATE:
            raise TaskOperationError("Templates cannot be continued; fork them instead")
        _check_state(task)
        async with task.lock:
            if task.run is not None:
                raise TaskConflict("Task is still running; stop it or wait until it finishes")
            params = task.params.updated(overrides)
            await self._runner.admit(
                engine, task, prompt, params, api_key_id=api_key_id, constraint=constraint
            )
        await self._save_and_launch(engine, task)
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
        self._runner.cancel(task)

    async def as_template(self, engine: Engine, task_id: str) -> Task:
        """Freeze a copy of the task's state and text as a template (the source stays)."""
        source = await self.get(engine, task_id)
        if source.kind is TaskKind.TEMPLATE:
            raise TaskOperationError("Task is already a template")
        _check_state(source)
        state, pending = source.resume_point(engine.codec)
        template = Task.new(TaskKind.TEMPLATE, source.params, state, pending)
        template.copy_text(source)
        self._registry.register(template)
        await self._registry.save(engine, template)
        return template

    async def delete(self, engine: Engine, task_id: str, *, force: bool) -> None:
        """Stop the task if it runs, then remove it from RAM, storage and the state store."""
        task = await self.get(engine, task_id)
        if task.kind is TaskKind.TEMPLATE and not force:
            raise Forbidden("Cannot delete template without force=true")
        task.deleted = True
        self.cancel_run(task)
        self._registry.drop(task)
        if task.kind.persistent:
            await self._registry.forget(engine, task)

    async def listing(self, limit: int = 100) -> TaskListing:
        return await self._registry.listing(limit)

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

    async def _start_new(
        self,
        engine: Engine,
        task: Task,
        prompt: str | list[int] | None,
        params: GenParams,
        *,
        api_key_id: str | None,
        constraint: OutputConstraint | None,
    ) -> None:
        """Admit a new task's first run, then hold it in the registry and start the run."""
        await self._runner.admit(engine, task, prompt, params, api_key_id=api_key_id, constraint=constraint)
        self._registry.register(task)
        await self._save_and_launch(engine, task)

    async def _save_and_launch(self, engine: Engine, task: Task) -> None:
        """Write a persistent task's row with its admitted run, then start the run (even when the
        write failed: the task keeps working from RAM)."""
        try:
            if task.kind.persistent:
                await self._registry.save(engine, task)
        finally:
            self._runner.launch(engine, task)


def _check_state(task: Task) -> None:
    if task.state_lost:
        raise TaskConflict("The state of this task was lost (it was made by another model?)")
