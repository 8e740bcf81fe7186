"""Rows of `tasks` (see `models.TaskRecord`) as the domain's `StoredTask`s: `TaskRepo`, the
`TaskRepository` of `domain/task_store.py`, which `db/repo.py`'s unit of work carries.

Like every repository this one only adds, queries and flushes; the task services own the
transaction.
"""

from __future__ import annotations

import json

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from rwkv_gateway.db.models import TaskRecord
from rwkv_gateway.domain.task_store import StoredTask


def _stored(row: TaskRecord) -> StoredTask:
    return StoredTask(
        task_id=row.task_id,
        kind=row.kind,
        params=row.params,
        state_key=row.state_key,
        pending_tokens=[int(t) for t in json.loads(row.pending_tokens)],
        result=row.result,
        piece_ends=[int(e) for e in json.loads(row.piece_ends)],
        prefill_time=row.prefill_time,
        gen_time=row.gen_time,
        generated_tokens=row.generated_tokens,
        error=row.error,
    )


def _fill(row: TaskRecord, task: StoredTask) -> None:
    """Set every column but the keys and timestamps."""
    row.kind = task.kind
    row.params = task.params
    row.state_key = task.state_key
    row.pending_tokens = json.dumps(task.pending_tokens)
    row.result = task.result
    row.piece_ends = json.dumps(task.piece_ends)
    row.prefill_time = task.prefill_time
    row.gen_time = task.gen_time
    row.generated_tokens = task.generated_tokens
    row.error = task.error


class TaskRepo:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def _row(self, task_id: str) -> TaskRecord | None:
        query = select(TaskRecord).where(TaskRecord.task_id == task_id)
        return (await self.session.scalars(query)).one_or_none()

    async def get(self, task_id: str) -> StoredTask | None:
        row = await self._row(task_id)
        return None if row is None else _stored(row)

    async def save(self, task: StoredTask) -> None:
        """Insert the row or update every column of the existing one."""
        row = await self._row(task.task_id)
        if row is None:
            row = TaskRecord(task_id=task.task_id)
            self.session.add(row)
        _fill(row, task)
        await self.session.flush()

    async def delete(self, task_id: str) -> bool:
        result = await self.session.execute(delete(TaskRecord).where(TaskRecord.task_id == task_id))
        return bool(getattr(result, "rowcount", 0))

    async def count(self) -> int:
        return (await self.session.scalar(select(func.count()).select_from(TaskRecord))) or 0

    async def recent_ids(self, limit: int) -> list[str]:
        """Task ids, most recently updated first."""
        query = select(TaskRecord.task_id).order_by(TaskRecord.updated_at.desc(), TaskRecord.id.desc())
        return list((await self.session.scalars(query.limit(limit))).all())
