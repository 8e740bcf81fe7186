"""The accounts service's storage port: the account row and the repository of users and their login
tokens, gathered with the role-play character and conversation repositories in `UserUnit`.

`UserUnit` reaches everything a `RoleplayUnit` does (`domain/roleplay_store.py`), so deleting a user
shares the role-play services' clean-up. `db/repo.py` implements these protocols; `services/users.py`
sees only them (docs/architecture.md#layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from rwkv_gateway.domain.roleplay_store import (
    CharacterRepository,
    ConversationRepository,
    GuestRepository,
    UserRow,
)
from rwkv_gateway.domain.storage import UnitOfWork


class AccountRow(UserRow, Protocol):
    """A stored account: a named user with a password hash, or a guest (no password)."""

    @property
    def password_hash(self) -> str | None: ...
    @property
    def is_guest(self) -> bool: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def defaults_given(self) -> bool: ...


class UserRepository(GuestRepository, Protocol):
    """Accounts and their login tokens (one per user, stored as a digest); changed by id."""

    async def get_by_name(self, name: str) -> AccountRow | None: ...

    async def add(self, name: str, password_hash: str | None, *, is_guest: bool) -> AccountRow: ...

    async def list(self, *, guests: bool = False) -> Sequence[AccountRow]:
        """Accounts by name; guests only when asked."""
        ...

    async def token_hash(self, user_id: int) -> str | None:
        """The digest of the user's current token; None when it has none."""
        ...

    async def replace_token(self, user_id: int, token_hash: str) -> None:
        """Make `token_hash` the user's only token."""
        ...

    async def set_password(self, user_id: int, password_hash: str) -> None: ...

    async def set_defaults_given(self, user_id: int) -> None:
        """Record that the default characters were given (once per user)."""
        ...

    async def set_last_seen(self, user_id: int, at: datetime) -> None: ...


class UserUnit(UnitOfWork, Protocol):
    """What one transaction of the accounts service reaches."""

    @property
    def users(self) -> UserRepository: ...
    @property
    def characters(self) -> CharacterRepository: ...
    @property
    def conversations(self) -> ConversationRepository: ...
