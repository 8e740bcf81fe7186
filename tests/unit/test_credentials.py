"""CredentialService against a real migrated database (a SQLite file and PostgreSQL): OpenAI keys and
Baidu AK/SK pairs are made, checked, listed and revoked, secrets are stored as the design says, and
access tokens expire and die with their credential."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from rwkv_gateway.db.models import AccessToken, ApiCredential
from rwkv_gateway.db.session import SqlStorage
from rwkv_gateway.errors import InvalidParameter, NotFound
from rwkv_gateway.services.credentials import CredentialService
from support.postgres import BOTH

DB_BACKENDS = BOTH
POSTGRESQL_SLOW = True  # the README's command stays under 5 minutes; CI runs these in the slow tier

OPENAI_KEY_RE = re.compile(r"^sk-rwkv-[A-Za-z0-9_-]{48}$")
ACCESS_TOKEN_RE = re.compile(r"^24\.[0-9a-f]{32}\.(\d+)\.(\d+)\.\d+-\d+$")


class Clock:
    """A settable clock, so tokens can expire without sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2025, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(sessions: async_sessionmaker[AsyncSession], clock: Clock) -> CredentialService:
    return CredentialService(SqlStorage(sessions), clock=clock)


async def rows(sessions: async_sessionmaker[AsyncSession]) -> list[ApiCredential]:
    async with sessions() as session:
        return list((await session.scalars(select(ApiCredential).order_by(ApiCredential.id))).all())


async def test_openai_key_shape_and_verification(service: CredentialService, clock: Clock) -> None:
    created = await service.create("openai", "laptop")
    assert OPENAI_KEY_RE.match(created.api_key)
    assert (created.kind, created.secret_key, created.name, created.created_at) == (
        "openai",
        None,
        "laptop",
        clock.now,
    )
    info = await service.verify_openai_key(created.api_key)
    assert info is not None
    assert (info.id, info.kind, info.display, info.name) == (
        created.id,
        "openai",
        created.api_key[:12],
        "laptop",
    )
    assert info.active


@pytest.mark.parametrize(
    "presented",
    ["", "sk-rwkv-", "sk-rwkv-nope", "Bearer x", "WRONG-LAST-CHAR", "PREFIX-ONLY", "UPPER"],
)
async def test_wrong_openai_keys_are_refused(service: CredentialService, presented: str) -> None:
    key = (await service.create("openai")).api_key
    presented = {
        "WRONG-LAST-CHAR": key[:-1] + ("A" if key[-1] != "A" else "B"),
        "PREFIX-ONLY": key[:12],
        "UPPER": key.upper() if key.upper() != key else key.lower(),
    }.get(presented, presented)
    assert await service.verify_openai_key(presented) is None


async def test_openai_keys_are_stored_hashed(
    service: CredentialService,
    sessions: async_sessionmaker[AsyncSession],
    db_engine: AsyncEngine,
    db_file: Path,
    db_backend: str,
) -> None:
    openai = await service.create("openai")
    baidu = await service.create("baidu")
    stored = {row.kind: row for row in await rows(sessions)}
    assert openai.api_key not in stored["openai"].api_key
    assert stored["openai"].api_key.startswith(openai.api_key[:12])
    assert stored["openai"].secret is None
    # The SK must stay retrievable for bce-auth-v1 signatures.
    assert (stored["baidu"].api_key, stored["baidu"].secret) == (baidu.api_key, baidu.secret_key)
    if db_backend != "sqlite":
        return  # the bytes on disk are checked on SQLite, whose whole database is one file
    await db_engine.dispose()  # closes the connections, so SQLite folds its WAL back into the file
    data = b"".join(path.read_bytes() for path in db_file.parent.glob(f"{db_file.name}*"))
    assert openai.api_key.encode() not in data
    assert openai.api_key[12:].encode() not in data
    assert baidu.secret_key is not None and baidu.secret_key.encode() in data  # the bytes read are the DB's


async def test_baidu_pair_shape_and_verification(service: CredentialService) -> None:
    created = await service.create("baidu", "qianfan")
    assert re.fullmatch(r"[a-z0-9]{24}", created.api_key)
    assert created.secret_key is not None and re.fullmatch(r"[A-Za-z0-9]{32}", created.secret_key)
    assert await service.baidu_secret(created.api_key) == created.secret_key
    info = await service.verify_baidu_client(created.api_key, created.secret_key)
    assert info is not None and (info.id, info.kind, info.display) == (created.id, "baidu", created.api_key)

    assert await service.baidu_secret("unknown-ak") is None
    assert await service.verify_baidu_client(created.api_key, created.secret_key[:-1] + "!") is None
    assert await service.verify_baidu_client("unknown-ak", created.secret_key) is None
    assert (await service.check_baidu_client("unknown-ak", created.secret_key)).status == "unknown_client"
    assert (await service.check_baidu_client(created.api_key, "wrong")).status == "bad_secret"
    assert (await service.check_baidu_client(created.api_key, created.secret_key)).status == "ok"
    # An AK is not an OpenAI key and an OpenAI key is no AK.
    assert await service.verify_openai_key(created.api_key) is None
    openai = await service.create("openai")
    assert await service.baidu_secret(openai.api_key) is None


async def test_list_never_shows_secrets(service: CredentialService) -> None:
    openai = await service.create("openai", "a")
    baidu = await service.create("baidu")
    listed = await service.list()
    assert [(i.id, i.kind, i.display, i.name) for i in listed] == [
        (openai.id, "openai", openai.api_key[:12], "a"),
        (baidu.id, "baidu", baidu.api_key, ""),
    ]
    text = repr(listed)
    assert openai.api_key not in text
    assert baidu.secret_key is not None and baidu.secret_key not in text
    assert [i.id for i in await service.list("baidu")] == [baidu.id]
    assert [i.id for i in await service.list("openai")] == [openai.id]
    with pytest.raises(InvalidParameter):
        await service.list("anthropic")


@pytest.mark.parametrize("how", ["id", "full key", "prefix"])
async def test_revoke_openai_key(service: CredentialService, clock: Clock, how: str) -> None:
    created = await service.create("openai")
    other = await service.create("openai")
    identifier = {"id": str(created.id), "full key": created.api_key, "prefix": created.api_key[:12]}[how]
    clock.advance(60)
    assert await service.revoke(identifier)
    assert await service.verify_openai_key(created.api_key) is None
    assert await service.verify_openai_key(other.api_key) is not None
    assert not await service.revoke(identifier)  # already revoked: nothing active matches
    assert [i.id for i in await service.list()] == [other.id]
    revoked = [i for i in await service.list(include_revoked=True) if i.id == created.id]
    assert revoked[0].revoked_at == clock.now and not revoked[0].active


@pytest.mark.parametrize("how", ["id", "ak"])
async def test_revoke_baidu_pair(service: CredentialService, how: str) -> None:
    created = await service.create("baidu")
    assert created.secret_key is not None
    assert await service.revoke(str(created.id) if how == "id" else created.api_key)
    assert await service.baidu_secret(created.api_key) is None
    assert await service.verify_baidu_client(created.api_key, created.secret_key) is None
    assert (await service.check_baidu_client(created.api_key, created.secret_key)).status == "unknown_client"


@pytest.mark.parametrize("identifier", ["", "  ", "999", "sk-rwkv-xxxx", "sk-rwkv-" + "x" * 48, "no-such-ak"])
async def test_revoke_unknown_matches_nothing(service: CredentialService, identifier: str) -> None:
    await service.create("openai")
    await service.create("baidu")
    assert not await service.revoke(identifier)
    assert len(await service.list()) == 2


async def test_revoke_refuses_an_ambiguous_prefix(
    service: CredentialService, sessions: async_sessionmaker[AsyncSession]
) -> None:
    first = await service.create("openai")
    second = await service.create("openai")
    # Make the second key's display prefix collide with the first's (1 in 16.7M by chance).
    async with sessions() as session, session.begin():
        row = await session.get(ApiCredential, second.id)
        assert row is not None
        row.api_key = first.api_key[:12] + row.api_key[12:]
    with pytest.raises(InvalidParameter, match="several"):
        await service.revoke(first.api_key[:12])
    assert await service.revoke(first.api_key)  # the full key is never ambiguous
    assert await service.revoke(first.api_key[:12])  # and now only the second one matches


async def test_prefix_lookup_treats_wildcards_literally(service: CredentialService) -> None:
    await service.create("openai")
    assert not await service.revoke("sk-rwkv-____")
    assert not await service.revoke("sk-rwkv-%%%%")
    assert len(await service.list()) == 1


async def test_any_active(service: CredentialService) -> None:
    assert not await service.any_active("openai")
    assert not await service.any_active("baidu")
    created = await service.create("openai")
    assert await service.any_active("openai")
    assert not await service.any_active("baidu")
    await service.revoke(created.api_key)
    assert not await service.any_active("openai")
    with pytest.raises(InvalidParameter):
        await service.any_active("nope")


async def test_access_token_lifecycle(
    service: CredentialService, sessions: async_sessionmaker[AsyncSession], clock: Clock
) -> None:
    cred = await service.create("baidu")
    issued = await service.issue_access_token(cred.id, ttl_s=3600)
    match = ACCESS_TOKEN_RE.match(issued.access_token)
    assert match is not None
    assert int(match.group(1)) == issued.expires_in == 3600
    assert int(match.group(2)) == int((clock.now + timedelta(seconds=3600)).timestamp())
    assert issued.refresh_token.startswith("25.") and issued.refresh_token != issued.access_token
    assert issued.expires_at == clock.now + timedelta(seconds=3600)

    check = await service.check_access_token(issued.access_token)
    assert check.status == "ok"
    assert check.credential is not None and check.credential.id == cred.id

    # Only digests are kept.
    async with sessions() as session:
        hashes = (await session.scalars(select(AccessToken.token_hash))).all()
    assert len(hashes) == 2 and issued.access_token not in hashes
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes)

    clock.advance(3599)
    assert (await service.check_access_token(issued.access_token)).status == "ok"
    clock.advance(1)
    expired = await service.check_access_token(issued.access_token)
    assert expired.status == "expired" and expired.credential is not None


async def test_default_ttl_is_thirty_days(service: CredentialService) -> None:
    cred = await service.create("baidu")
    issued = await service.issue_access_token(cred.id)
    assert issued.expires_in == 2592000
    assert issued.access_token.split(".")[2] == "2592000"


@pytest.mark.parametrize(
    "token", ["", "24.", "24." + "0" * 32 + ".2592000.1.0-1", "garbage", "25.abc", "Bearer 24.x"]
)
async def test_unknown_tokens_are_invalid(service: CredentialService, token: str) -> None:
    cred = await service.create("baidu")
    await service.issue_access_token(cred.id)
    check = await service.check_access_token(token)
    assert check.status == "invalid" and check.credential is None


async def test_refresh_token_is_not_an_access_token(service: CredentialService) -> None:
    cred = await service.create("baidu")
    issued = await service.issue_access_token(cred.id)
    assert (await service.check_access_token(issued.refresh_token)).status == "invalid"
    assert await service.refresh_access_token(issued.access_token) is None


async def test_refresh_issues_a_new_pair_once(service: CredentialService, clock: Clock) -> None:
    cred = await service.create("baidu")
    issued = await service.issue_access_token(cred.id, ttl_s=10)
    clock.advance(11)
    assert (await service.check_access_token(issued.access_token)).status == "expired"
    renewed = await service.refresh_access_token(issued.refresh_token, ttl_s=10)
    assert renewed is not None and renewed.credential_id == cred.id
    assert (await service.check_access_token(renewed.access_token)).status == "ok"
    assert await service.refresh_access_token(issued.refresh_token) is None  # used up


async def test_revoking_the_credential_revokes_its_tokens(service: CredentialService, clock: Clock) -> None:
    cred = await service.create("baidu")
    other = await service.create("baidu")
    issued = await service.issue_access_token(cred.id)
    kept = await service.issue_access_token(other.id)
    assert await service.revoke(cred.api_key)
    check = await service.check_access_token(issued.access_token)
    assert check.status == "revoked" and check.credential is not None and not check.credential.active
    clock.advance(2592000 + 1)
    assert (await service.check_access_token(issued.access_token)).status == "revoked"  # revoked wins
    assert (await service.check_access_token(kept.access_token)).status == "expired"
    assert await service.refresh_access_token(issued.refresh_token) is None
    with pytest.raises(NotFound):
        await service.issue_access_token(cred.id)


async def test_issue_needs_a_known_credential_and_a_positive_ttl(service: CredentialService) -> None:
    with pytest.raises(NotFound):
        await service.issue_access_token(12345)
    cred = await service.create("baidu")
    with pytest.raises(InvalidParameter):
        await service.issue_access_token(cred.id, ttl_s=0)


async def test_unknown_kind_is_refused(service: CredentialService) -> None:
    with pytest.raises(InvalidParameter):
        await service.create("azure")  # type: ignore[arg-type]
