"""Rows of `tasks`: the persistent Task API tasks and templates (see `models.TaskRecord`).

Like every repository this one only adds, queries and flushes; the task service owns the
transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from rwkv_gateway.db.models import TaskRecord

#: Columns a save may set (everything but the keys and timestamps).
_FIELDS = (
    "kind",
    "params",
    "state_key",
    "pending_tokens",
    "result",
    "piece_ends",
    "prefill_time",
    "gen_time",
    "generated_tokens",
    "error",
)


class TaskRepo:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, task_id: str) -> TaskRecord | None:
        query = select(TaskRecord).where(TaskRecord.task_id == task_id)
        return (await self.session.scalars(query)).one_or_none()

    async def save(self, task_id: str, **values: Any) -> TaskRecord:
        """Insert the row or update the given columns of the existing one."""
        unknown = set(values) - set(_FIELDS)
        if unknown:
            raise ValueError(f"unknown task columns: {sorted(unknown)}")
        row = await self.get(task_id)
        if row is None:
            row = TaskRecord(task_id=task_id, **values)
            self.session.add(row)
        else:
            for name, value in values.items():
                setattr(row, name, value)
        await self.session.flush()
        return row

    async def delete(self, task_id: str) -> bool:
        result = await self.session.execute(delete(TaskRecord).where(TaskRecord.task_id == task_id))
        return bool(getattr(result, "rowcount", 0))

    async def count(self) -> int:
        return (await self.session.scalar(select(func.count()).select_from(TaskRecord))) or 0

    async def recent_ids(self, limit: int) -> Sequence[str]:
        """Task ids, most recently updated first."""
        query = select(TaskRecord.task_id).order_by(TaskRecord.updated_at.desc(), TaskRecord.id.desc())
        return (await self.session.scalars(query.limit(limit))).all()
