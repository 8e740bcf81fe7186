"""The storage port: how a service runs one short transaction without knowing the database.

A service holds a `Storage` and, for each use case, opens one unit of work (`async with
storage.transaction() as uow:`), reaches the tables through the repositories the unit carries, and
ends it with `await uow.commit()`; leaving the block without committing rolls everything back. The
service owns the transaction; repositories only add, query and flush (docs/architecture.md#layers).

Each service names the repositories it needs as a `UnitOfWork` sub-protocol next to them (for
example `CredentialUnit` in `domain/credential_store.py`); `db/` implements one unit of work that
carries every repository, so it satisfies all of them, and `app.py` hands it to the services.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Protocol, TypeVar


def utcnow() -> datetime:
    """The current time as an aware UTC datetime (the only kind the storage layer accepts)."""
    return datetime.now(UTC)


class UnitOfWork(Protocol):
    """One open transaction. Sub-protocols add the repositories a service reads and writes."""

    async def commit(self) -> None:
        """Make every write of this unit of work permanent (at most once, at its end)."""
        ...


U_co = TypeVar("U_co", bound=UnitOfWork, covariant=True)


class StorageHealth(Protocol):
    """What readiness asks the storage (docs/operations.md#health)."""

    async def unavailable(self) -> str | None:
        """None while the database answers; otherwise why it does not (cheap: answers are cached)."""
        ...


class Storage(Protocol[U_co]):
    """Opens units of work: each `transaction()` is a new, short one."""

    def transaction(self) -> AbstractAsyncContextManager[U_co]:
        """A unit of work for one use case; closing it without `commit()` rolls it back."""
        ...
