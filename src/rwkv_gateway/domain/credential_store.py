"""The credentials service's storage port: the rows it reads and the repositories of API credentials
and of the access tokens issued for them, gathered in `CredentialUnit`.

`db/repo.py` implements the repositories (its ORM rows have these attributes) and its unit of work
carries both; `services/credentials.py` sees only these protocols (docs/architecture.md#layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from rwkv_gateway.domain.storage import UnitOfWork


class CredentialRow(Protocol):
    """A stored credential: an OpenAI key (as its display prefix and digest) or a Baidu AK/SK pair."""

    @property
    def id(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def api_key(self) -> str: ...
    @property
    def secret(self) -> str | None: ...
    @property
    def name(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def revoked_at(self) -> datetime | None: ...


class AccessTokenRow(Protocol):
    """An issued access or refresh token (stored as a digest)."""

    @property
    def id(self) -> int: ...
    @property
    def expires_at(self) -> datetime: ...
    @property
    def revoked_at(self) -> datetime | None: ...


class CredentialRepository(Protocol):
    """Credentials, matched by the stored `api_key` value the service computes."""

    async def add(
        self, kind: str, api_key: str, secret: str | None, name: str, *, created_at: datetime | None = None
    ) -> CredentialRow: ...

    async def get(self, credential_id: int) -> CredentialRow | None: ...

    async def get_by_key(
        self, kind: str, key_value: str, *, active_only: bool = False
    ) -> CredentialRow | None: ...

    async def find_active_by_key_prefix(self, prefix: str) -> Sequence[CredentialRow]: ...

    async def list(
        self, kind: str | None = None, *, include_revoked: bool = False
    ) -> Sequence[CredentialRow]: ...

    async def count_active(self, kind: str) -> int: ...

    async def revoke(self, credential_id: int, at: datetime) -> bool:
        """Revoke an active credential and its live tokens; False when it was not active."""
        ...


class AccessTokenRepository(Protocol):
    """Access and refresh tokens, found by the digest of the token."""

    async def add(
        self, credential_id: int, token_hash: str, *, created_at: datetime, expires_at: datetime
    ) -> AccessTokenRow: ...

    async def get_with_credential(self, token_hash: str) -> tuple[AccessTokenRow, CredentialRow] | None: ...

    async def revoke(self, token_id: int, at: datetime) -> None: ...


class CredentialUnit(UnitOfWork, Protocol):
    """What one transaction of the credentials service reaches."""

    @property
    def credentials(self) -> CredentialRepository: ...
    @property
    def access_tokens(self) -> AccessTokenRepository: ...
