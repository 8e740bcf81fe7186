"""The request log's storage port: the repository that writes `RequestRecord`s, in `RequestLogUnit`.

`db/repo.py` implements it; `services/requestlog.py` sees only this protocol
(docs/architecture.md#layers).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from rwkv_gateway.domain.storage import UnitOfWork
from rwkv_gateway.domain.types import RequestRecord


class RequestLogRepository(Protocol):
    async def add_many(self, records: Iterable[RequestRecord]) -> int:
        """Add every record (one flush); returns how many were added."""
        ...


class RequestLogUnit(UnitOfWork, Protocol):
    """What one transaction of the request logger reaches."""

    @property
    def request_log(self) -> RequestLogRepository: ...
