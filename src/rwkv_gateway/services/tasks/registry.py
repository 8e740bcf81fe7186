"""Which tasks exist: the tasks held in RAM, in front of the persistent ones in storage.

Temporary tasks (`TMP_`) live in RAM only and are evicted when idle or when there are too many.
Persistent tasks (`TASK_`) and templates (`_TMPL_`) are written to storage (metadata and text, each
write one short transaction of a `TaskUnit`: domain/task_store.py) and
their snapshots to the engine's state store with `persist=True`, after creation and after every run,
so they survive restarts; only the most recently used of them stay in RAM, and one that left is
loaded again when asked for. Several replicas may share the storage (docs/deployment.md): a persistent
task held in RAM is checked against its row whenever it is asked for, and loaded again (or dropped)
when another replica has continued, re-prompted or deleted it since this one last wrote or read it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from rwkv_gateway.domain.engine import Engine
from rwkv_gateway.domain.storage import Storage
from rwkv_gateway.domain.task_store import StoredTask, TaskUnit
from rwkv_gateway.errors import GatewayError
from rwkv_gateway.services.tasks.model import (
    GenParams,
    Task,
    TaskConfig,
    TaskKind,
    TaskListing,
    TaskNotFound,
    TaskStatus,
    is_task_id,
)

logger = logging.getLogger(__name__)


class TaskRegistry:
    """The tasks in RAM, least recently used first, and the storage behind them. Event loop only."""

    def __init__(self, storage: Storage[TaskUnit], config: TaskConfig) -> None:
        self._storage = storage
        self.config = config
        self._tasks: OrderedDict[str, Task] = OrderedDict()
        self._load_lock = asyncio.Lock()

    def in_ram(self) -> list[Task]:
        return list(self._tasks.values())

    def register(self, task: Task) -> None:
        self._tasks[task.id] = task
        self._tasks.move_to_end(task.id)
        self.evict(keep=task.id)

    def keep_running(self, task: Task) -> None:
        """Put back a task that is about to run if it was evicted while being admitted: a running
        task stays in RAM."""
        if not task.deleted and self._tasks.get(task.id) is not task:
            self._tasks[task.id] = task

    def evict(self, keep: str | None = None) -> None:
        """Drop idle temporary tasks, then the least recently used finished ones over the limits
        (never `keep`, the task a caller is about to use)."""
        now = time.monotonic()
        cfg = self.config
        for task in list(self._tasks.values()):
            idle = now - task.last_used > cfg.tmp_idle_s
            if task.kind is TaskKind.TMP and task.run is None and idle and task.id != keep:
                self.drop(task)
        tmp = [t for t in self._tasks.values() if t.kind is TaskKind.TMP]
        persistent = [t for t in self._tasks.values() if t.kind is not TaskKind.TMP]
        for group, limit in ((tmp, cfg.tmp_max), (persistent, cfg.cache_size)):
            excess = len(group) - limit
            for task in group:  # least recently used first
                if excess <= 0:
                    break
                # Running tasks stay; persistent ones only leave RAM once their row is written.
                if task.run is None and not task.save_lock.locked() and task.id != keep:
                    self.drop(task)
                    excess -= 1

    def drop(self, task: Task) -> None:
        self._tasks.pop(task.id, None)
        task.notify()

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_s)
            self.evict()

    async def get(self, engine: Engine, task_id: str) -> Task:
        """The task (loaded from storage if it left RAM); TaskNotFound otherwise."""
        if not is_task_id(task_id):
            raise TaskNotFound
        task = self._tasks.get(task_id)
        if TaskKind.of(task_id).persistent and (task is None or _settled(task)):
            async with self._load_lock:
                task = self._tasks.get(task_id)
                if task is None:
                    task = await self._load(engine, task_id)
                    if task is not None:
                        self.register(task)
                elif _settled(task):
                    task = await self._refresh(engine, task)
        if task is None:
            raise TaskNotFound
        if task_id in self._tasks:
            self._tasks.move_to_end(task_id)
        task.touch()
        return task

    async def listing(self, limit: int) -> TaskListing:
        async with self._storage.transaction() as uow:
            count = await uow.tasks.count()
            recent = await uow.tasks.recent_ids(limit)
        tmp = sum(1 for t in self._tasks.values() if t.kind is TaskKind.TMP)
        return TaskListing(list(self._tasks), count, recent, count + tmp)

    # ------------------------------------------------------------------ storage

    async def _refresh(self, engine: Engine, task: Task) -> Task | None:
        """`task` as its row now stands: the same object unless another replica wrote or deleted the
        row since this process last did (a row never written, because its save failed, keeps RAM)."""
        async with self._storage.transaction() as uow:
            row = await uow.tasks.get(task.id)
        if task.saved_row is None or row == task.saved_row:
            return task
        self.drop(task)
        task.deleted = True  # this copy is stale: its subscribers stop, nothing saves it again
        if row is None:
            logger.info("task %s was deleted by another replica", task.id)
            return None
        logger.info("task %s was changed by another replica; loading it again", task.id)
        if row.state_key is not None and engine.snapshots is not None:
            await asyncio.to_thread(engine.snapshots.forget_cached, row.state_key)
        fresh = await self._from_row(engine, row)
        self.register(fresh)
        return fresh

    async def _load(self, engine: Engine, task_id: str) -> Task | None:
        async with self._storage.transaction() as uow:
            row = await uow.tasks.get(task_id)
        return None if row is None else await self._from_row(engine, row)

    async def _from_row(self, engine: Engine, row: StoredTask) -> Task:
        task = _from_stored(row)
        task.saved_row = row
        task_id = row.task_id
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

    async def save(self, engine: Engine, task: Task) -> None:
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
                stored = _to_stored(task, key, pending)
                async with self._storage.transaction() as uow:
                    await uow.tasks.save(stored)
                    await uow.commit()
                task.saved_row = stored
            except Exception:
                logger.exception("saving task %s failed", task.id)
        self.evict()  # the task may leave RAM now that its row is written

    async def forget(self, engine: Engine, task: Task) -> None:
        """Remove a deleted persistent task from storage and its snapshot from the state store."""
        async with task.save_lock:
            async with self._storage.transaction() as uow:
                await uow.tasks.delete(task.id)
                await uow.commit()
            if engine.snapshots is not None:
                await asyncio.to_thread(engine.snapshots.delete, task.state_key)


def _settled(task: Task) -> bool:
    """Neither running nor being written: what is in RAM should equal the row."""
    return not task.deleted and task.run is None and not task.save_lock.locked()


def _to_stored(task: Task, state_key: str | None, pending: list[int]) -> StoredTask:
    ends: list[int] = []
    offset = 0
    for piece in task.pieces:
        offset += len(piece)
        ends.append(offset)
    return StoredTask(
        task_id=task.id,
        kind=task.kind.value,
        params=task.params.to_json(),
        state_key=state_key,
        pending_tokens=pending,
        result=task.result,
        piece_ends=ends,
        prefill_time=task.prefill_time,
        gen_time=task.gen_time,
        generated_tokens=task.generated,
        error=task.error,
    )


def _from_stored(row: StoredTask) -> Task:
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
