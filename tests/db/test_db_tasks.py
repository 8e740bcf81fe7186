"""The tasks repository in the storage's unit of work (`TaskUnit`) against a real migrated database (a
SQLite file and PostgreSQL): a task round-trips, a save replaces what was stored, ids list newest first,
a delete says what it did."""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from rwkv_gateway.db.session import SqlStorage
from rwkv_gateway.domain.storage import Storage
from rwkv_gateway.domain.task_store import StoredTask, TaskUnit
from support.postgres import BOTH

DB_BACKENDS = BOTH


def stored(task_id: str, **changes: Any) -> StoredTask:
    task = StoredTask(
        task_id=task_id,
        kind="task",
        params='{"max_tokens": 8}',
        state_key=f"task:{task_id}",
        pending_tokens=[3, 1, 4],
        result="Hello, world",
        piece_ends=[5, 12],
        prefill_time=0.25,
        gen_time=1.5,
        generated_tokens=4,
        error=None,
    )
    return dataclasses.replace(task, **changes)


async def save(storage: Storage[TaskUnit], task: StoredTask) -> None:
    async with storage.transaction() as uow:
        await uow.tasks.save(task)
        await uow.commit()


async def test_a_saved_task_loads_as_it_was_saved(sessions: async_sessionmaker[AsyncSession]) -> None:
    storage: Storage[TaskUnit] = SqlStorage(sessions)
    task = stored("TASK_" + "a" * 32)
    await save(storage, task)
    async with storage.transaction() as uow:
        assert await uow.tasks.get(task.task_id) == task
        assert await uow.tasks.get("TASK_" + "b" * 32) is None


async def test_saving_again_replaces_every_field(sessions: async_sessionmaker[AsyncSession]) -> None:
    storage = SqlStorage(sessions)
    first = stored("_TMPL_" + "c" * 32, kind="template")
    await save(storage, first)
    second = dataclasses.replace(
        first,
        state_key=None,
        pending_tokens=[],
        result="Hi",
        piece_ends=[2],
        error="stopped",
        generated_tokens=9,
    )
    await save(storage, second)
    async with storage.transaction() as uow:
        assert await uow.tasks.get(first.task_id) == second
        assert await uow.tasks.count() == 1


async def test_recent_ids_newest_first_and_delete(sessions: async_sessionmaker[AsyncSession]) -> None:
    storage = SqlStorage(sessions)
    ids = [f"TASK_{i:032x}" for i in range(3)]
    for task_id in ids:
        await save(storage, stored(task_id))
    async with storage.transaction() as uow:
        assert await uow.tasks.recent_ids(2) == [ids[2], ids[1]]
    await save(storage, stored(ids[0], result="again", piece_ends=[5]))
    async with storage.transaction() as uow:
        assert (await uow.tasks.recent_ids(10))[0] == ids[0]
        assert await uow.tasks.delete(ids[1])
        assert not await uow.tasks.delete(ids[1])
        await uow.commit()
    async with storage.transaction() as uow:
        assert await uow.tasks.count() == 2
        assert sorted(await uow.tasks.recent_ids(10)) == [ids[0], ids[2]]
