"""API credentials: OpenAI-style keys and Baidu AK/SK pairs, and the OAuth access tokens issued for them.

The service makes new credentials (secrets come from `secrets`, shown to the operator once), checks
what clients present, lists and revokes them. OpenAI keys are stored only as a SHA-256 digest behind a
short non-secret display prefix (`api_key` = `<first 12 chars>$<sha256 hex>`), so the database never
holds a usable key yet `keys list` can still say which key is which. A Baidu AK is stored as is (it is
an identifier, sent in clear in every signed request) and its SK retrievably, because `bce-auth-v1`
signatures are HMACs keyed by the SK itself. Access tokens (`24.…`) and refresh tokens (`25.…`) for
Baidu's `/oauth/2.0/token` share the `access_tokens` table as digests; their prefix keeps one from
passing for the other. Every method runs in its own short transaction, a unit of work of the
`Storage` it is given (`domain/credential_store.py`).
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, get_args

from rwkv_gateway.domain.credential_store import (
    AccessTokenRepository,
    AccessTokenRow,
    CredentialRepository,
    CredentialRow,
    CredentialUnit,
)
from rwkv_gateway.domain.storage import Storage, utcnow
from rwkv_gateway.errors import InvalidParameter, NotFound

CredentialKind = Literal["openai", "baidu"]
TokenStatus = Literal["ok", "expired", "revoked", "invalid"]
BaiduClientStatus = Literal["ok", "unknown_client", "bad_secret"]

KINDS: tuple[str, ...] = get_args(CredentialKind)
OPENAI_KEY_PREFIX = "sk-rwkv-"
#: Characters of an OpenAI key kept in clear for display: "sk-rwkv-" and 4 random characters, which
#: tell keys apart in a listing while leaving 44 random characters (264 bits) secret.
OPENAI_DISPLAY_LEN = 12
#: Separates the display prefix from the digest in `api_credentials.api_key`; not in the url-safe
#: base64 alphabet, so a prefix never runs into the digest.
_DIGEST_SEP = "$"
_AK_ALPHABET = string.ascii_lowercase + string.digits
_SK_ALPHABET = string.ascii_letters + string.digits
ACCESS_TOKEN_TTL_S = 2_592_000  # 30 days, Baidu's default
#: Baidu's refresh tokens live ten years (`25.<hex>.315360000.…`).
REFRESH_TOKEN_TTL_S = 315_360_000
_ACCESS_PREFIX = "24."
_REFRESH_PREFIX = "25."


@dataclass(frozen=True, slots=True)
class CreatedCredential:
    """A credential just made, with its secrets: the only time they can be shown."""

    id: int
    kind: CredentialKind
    api_key: str
    #: The Baidu Secret Key; None for OpenAI keys.
    secret_key: str | None
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class CredentialInfo:
    """A credential without its secrets. `display` is the AK (Baidu) or the key's first 12 characters."""

    id: int
    kind: CredentialKind
    display: str
    name: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """An access token (and the refresh token that renews it) as Baidu's token endpoint returns them."""

    access_token: str
    refresh_token: str
    expires_in: int
    expires_at: datetime
    credential_id: int


@dataclass(frozen=True, slots=True)
class TokenCheck:
    """The outcome of presenting an access token; `credential` is set whenever the token was found."""

    status: TokenStatus
    credential: CredentialInfo | None = None


@dataclass(frozen=True, slots=True)
class BaiduClientCheck:
    """The outcome of a `client_id`/`client_secret` pair; the two failures are different OAuth errors."""

    status: BaiduClientStatus
    credential: CredentialInfo | None = None


def _digest(value: str) -> str:
    # A plain SHA-256 is enough here: every value digested is a server-made random string of 128 bits
    # or more, so there is nothing to guess and no dictionary to precompute. Slow salted hashes
    # (Argon2) protect low-entropy passwords; here they would only add milliseconds to every request
    # and rule out finding the row by an indexed equality lookup.
    return hashlib.sha256(value.encode()).hexdigest()


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _random(alphabet: str, length: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _stored_openai_key(key: str) -> str:
    return f"{key[:OPENAI_DISPLAY_LEN]}{_DIGEST_SEP}{_digest(key)}"


def _check_kind(kind: str) -> CredentialKind:
    if kind not in KINDS:
        raise InvalidParameter(f"unknown credential kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind  # type: ignore[return-value]  # checked against the Literal's values just above


def _info(row: CredentialRow) -> CredentialInfo:
    kind = _check_kind(row.kind)
    display = row.api_key.partition(_DIGEST_SEP)[0] if kind == "openai" else row.api_key
    return CredentialInfo(
        id=row.id,
        kind=kind,
        display=display,
        name=row.name,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def _token(prefix: str, ttl_s: int, expires_at: datetime, credential_id: int) -> str:
    # Baidu's shape, `24.<32 hex>.<expires_in>.<expiry unix s>.<uid>-<appid>`; clients treat it as
    # opaque. Only the 128 random bits make it unguessable; uid is 0 (one tenant), appid the credential.
    return f"{prefix}{secrets.token_hex(16)}.{ttl_s}.{int(expires_at.timestamp())}.0-{credential_id}"


class CredentialService:
    """Creates, checks, lists and revokes credentials and their access tokens.

    `clock` returns the current aware UTC time; tests pass their own to make tokens expire.
    """

    def __init__(
        self,
        storage: Storage[CredentialUnit],
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._storage = storage
        self._clock = clock

    async def create(self, kind: CredentialKind, name: str | None = None) -> CreatedCredential:
        """Make a new OpenAI key or Baidu AK/SK pair; the returned secrets are not retrievable later."""
        kind = _check_kind(kind)
        secret_key: str | None
        if kind == "openai":
            api_key = OPENAI_KEY_PREFIX + secrets.token_urlsafe(36)  # 36 bytes -> 48 characters
            stored_key, secret_key = _stored_openai_key(api_key), None
        else:
            api_key = stored_key = _random(_AK_ALPHABET, 24)
            secret_key = _random(_SK_ALPHABET, 32)
        async with self._storage.transaction() as uow:
            row = await uow.credentials.add(
                kind, stored_key, secret_key, name or "", created_at=self._clock()
            )
            await uow.commit()
        return CreatedCredential(
            id=row.id,
            kind=kind,
            api_key=api_key,
            secret_key=secret_key,
            name=row.name,
            created_at=row.created_at,
        )

    async def verify_openai_key(self, presented: str) -> CredentialInfo | None:
        """The active OpenAI credential whose key is `presented`, else None."""
        if not presented.startswith(OPENAI_KEY_PREFIX):
            return None
        stored = _stored_openai_key(presented)
        async with self._storage.transaction() as uow:
            row = await uow.credentials.get_by_key("openai", stored, active_only=True)
        # The lookup compared digests, which leak nothing about the key through timing; this second,
        # constant-time comparison guards against a backend collation that matches loosely.
        if row is None or not _same(row.api_key, stored):
            return None
        return _info(row)

    async def any_active(self, kind: str) -> bool:
        """Whether any unrevoked credential of `kind` exists (one COUNT query; callers may cache it)."""
        kind = _check_kind(kind)
        async with self._storage.transaction() as uow:
            return await uow.credentials.count_active(kind) > 0

    async def baidu_secret(self, access_key: str) -> str | None:
        """The Secret Key of the active Baidu credential with this AK, for recomputing signatures."""
        async with self._storage.transaction() as uow:
            row = await uow.credentials.get_by_key("baidu", access_key, active_only=True)
        return None if row is None else row.secret

    async def check_baidu_client(self, client_id: str, client_secret: str) -> BaiduClientCheck:
        """Check an OAuth `client_id`/`client_secret` pair, telling an unknown AK from a wrong SK."""
        async with self._storage.transaction() as uow:
            row = await uow.credentials.get_by_key("baidu", client_id, active_only=True)
        if row is None or row.secret is None:
            return BaiduClientCheck("unknown_client")
        if not _same(row.secret, client_secret):
            return BaiduClientCheck("bad_secret")
        return BaiduClientCheck("ok", _info(row))

    async def verify_baidu_client(self, client_id: str, client_secret: str) -> CredentialInfo | None:
        """The active Baidu credential with this AK and SK, else None."""
        return (await self.check_baidu_client(client_id, client_secret)).credential

    async def list(
        self, kind: str | None = None, *, include_revoked: bool = False
    ) -> builtins.list[CredentialInfo]:
        """Credentials in creation order, without secrets or full keys."""
        if kind is not None:
            kind = _check_kind(kind)
        async with self._storage.transaction() as uow:
            rows = await uow.credentials.list(kind, include_revoked=include_revoked)
        return [_info(row) for row in rows]

    async def revoke(self, identifier: str) -> bool:
        """Revoke one active credential named by id, full OpenAI key, display prefix or Baidu AK.

        Its access tokens are revoked with it. False when no active credential matches; an OpenAI
        display prefix shared by several active keys is refused rather than guessed at.
        """
        identifier = identifier.strip()
        if not identifier:
            return False
        async with self._storage.transaction() as uow:
            repo = uow.credentials
            row = await self._find_active(repo, identifier)
            if row is None:
                return False
            revoked = await repo.revoke(row.id, self._clock())
            await uow.commit()
            return revoked

    async def _find_active(self, repo: CredentialRepository, identifier: str) -> CredentialRow | None:
        if identifier.isdecimal():
            row = await repo.get(int(identifier))
            if row is not None and row.revoked_at is None:
                return row
        if identifier.startswith(OPENAI_KEY_PREFIX) and len(identifier) > OPENAI_DISPLAY_LEN:
            return await repo.get_by_key("openai", _stored_openai_key(identifier), active_only=True)
        if len(identifier) == OPENAI_DISPLAY_LEN and identifier.startswith(OPENAI_KEY_PREFIX):
            matches = await repo.find_active_by_key_prefix(identifier + _DIGEST_SEP)
            if len(matches) > 1:
                ids = ", ".join(str(m.id) for m in matches)
                raise InvalidParameter(f"{identifier} matches several keys (ids {ids}); revoke one by id")
            return matches[0] if matches else None
        return await repo.get_by_key("baidu", identifier, active_only=True)

    async def issue_access_token(self, credential_id: int, ttl_s: int = ACCESS_TOKEN_TTL_S) -> IssuedToken:
        """Issue an access token (and a refresh token) for an active credential; both stored as digests."""
        if ttl_s < 1:
            raise InvalidParameter(f"ttl_s must be >= 1, got {ttl_s}", param="ttl_s")
        async with self._storage.transaction() as uow:
            row = await uow.credentials.get(credential_id)
            if row is None or row.revoked_at is not None:
                raise NotFound(f"no active credential with id {credential_id}")
            issued = await self._issue(uow.access_tokens, credential_id, ttl_s)
            await uow.commit()
            return issued

    async def refresh_access_token(
        self, refresh_token: str, ttl_s: int = ACCESS_TOKEN_TTL_S
    ) -> IssuedToken | None:
        """Trade a live refresh token for a new pair, using the old one up; None if it is not live."""
        if not refresh_token.startswith(_REFRESH_PREFIX):
            return None
        async with self._storage.transaction() as uow:
            tokens = uow.access_tokens
            found = await tokens.get_with_credential(_digest(refresh_token))
            if found is None or self._status(*found) != "ok":
                return None
            await tokens.revoke(found[0].id, self._clock())
            issued = await self._issue(tokens, found[1].id, ttl_s)
            await uow.commit()
            return issued

    async def check_access_token(self, token: str) -> TokenCheck:
        """Whether `token` is a live access token; "revoked" also when its credential was revoked."""
        if not token.startswith(_ACCESS_PREFIX):
            return TokenCheck("invalid")
        async with self._storage.transaction() as uow:
            found = await uow.access_tokens.get_with_credential(_digest(token))
        if found is None:
            return TokenCheck("invalid")
        return TokenCheck(self._status(*found), _info(found[1]))

    def _status(self, token: AccessTokenRow, credential: CredentialRow) -> TokenStatus:
        if token.revoked_at is not None or credential.revoked_at is not None:
            return "revoked"
        if token.expires_at <= self._clock():
            return "expired"
        return "ok"

    async def _issue(self, tokens: AccessTokenRepository, credential_id: int, ttl_s: int) -> IssuedToken:
        now = self._clock()
        expires_at = now + timedelta(seconds=ttl_s)
        refresh_expires_at = now + timedelta(seconds=REFRESH_TOKEN_TTL_S)
        access = _token(_ACCESS_PREFIX, ttl_s, expires_at, credential_id)
        refresh = _token(_REFRESH_PREFIX, REFRESH_TOKEN_TTL_S, refresh_expires_at, credential_id)
        await tokens.add(credential_id, _digest(access), created_at=now, expires_at=expires_at)
        await tokens.add(credential_id, _digest(refresh), created_at=now, expires_at=refresh_expires_at)
        return IssuedToken(
            access_token=access,
            refresh_token=refresh,
            expires_in=ttl_s,
            expires_at=expires_at,
            credential_id=credential_id,
        )
