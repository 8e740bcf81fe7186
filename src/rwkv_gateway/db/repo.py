"""Repositories: the queries of each table behind small classes that take an open `AsyncSession`.

Repositories only add, query and `flush`; they never commit or roll back. The service that opened
the session owns the transaction, so one use case commits all of its writes together or none.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from rwkv_gateway.db.models import RequestLogEntry
from rwkv_gateway.domain.types import RequestRecord


def _entry(record: RequestRecord) -> RequestLogEntry:
    return RequestLogEntry(
        request_id=record.request_id,
        dialect=record.dialect,
        user=record.user,
        api_key_id=record.api_key_id,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        ttft_ms=record.ttft_ms,
        total_ms=record.total_ms,
        finish_reason=record.finish_reason,
        created_at=datetime.fromtimestamp(record.created_at, UTC),
    )


class RequestLogRepo:
    """Rows of `request_log`, written from `RequestRecord`s."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, record: RequestRecord) -> RequestLogEntry:
        entry = _entry(record)
        self.session.add(entry)
        await self.session.flush()
        return entry

    async def add_many(self, records: Iterable[RequestRecord]) -> int:
        """Add every record with one flush; returns how many were added."""
        entries = [_entry(record) for record in records]
        self.session.add_all(entries)
        await self.session.flush()
        return len(entries)

    async def recent(self, limit: int = 100, *, dialect: str | None = None) -> Sequence[RequestLogEntry]:
        """The newest entries first (by time, then by insertion order)."""
        query = select(RequestLogEntry)
        if dialect is not None:
            query = query.where(RequestLogEntry.dialect == dialect)
        query = query.order_by(RequestLogEntry.created_at.desc(), RequestLogEntry.id.desc()).limit(limit)
        return (await self.session.scalars(query)).all()

    async def count(self) -> int:
        return (await self.session.scalar(select(func.count()).select_from(RequestLogEntry))) or 0
