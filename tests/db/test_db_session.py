"""The database engine and session factory on real databases: SQLite's connection pragmas, and on
SQLite files and PostgreSQL alike (the tests that take `sessions`) cascading deletes, constraints,
UTC timestamps and concurrent writers on the same rows, all on a schema built by the migrations."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from rwkv_gateway.db.migrate import upgrade
from rwkv_gateway.db.models import (
    AccessToken,
    ApiCredential,
    AuthToken,
    Character,
    Conversation,
    ConversationNode,
    User,
)
from rwkv_gateway.db.session import (
    SqlStorage,
    create_db_engine,
    is_sqlite,
    make_session_factory,
    sqlite_path,
)
from rwkv_gateway.domain.roleplay_store import NewNode
from support.postgres import BOTH

DB_BACKENDS = BOTH


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / "gateway.db"


@pytest.fixture
def url(db_url: str) -> str:
    return db_url


@pytest.fixture
async def engine(url: str) -> AsyncIterator[AsyncEngine]:
    await asyncio.to_thread(upgrade, url)
    engine = create_db_engine(url)
    yield engine
    await engine.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return make_session_factory(engine)


async def pragma(engine: AsyncEngine, name: str) -> object:
    async with engine.connect() as conn:
        return (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar()


async def test_pragmas_on_a_fresh_connection(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh' / 'g.db'}"
    engine = create_db_engine(url)
    try:
        assert await pragma(engine, "journal_mode") == "wal"
        assert await pragma(engine, "foreign_keys") == 1
        assert await pragma(engine, "busy_timeout") == 30_000
        assert await pragma(engine, "synchronous") == 1  # NORMAL
    finally:
        await engine.dispose()
    assert (tmp_path / "fresh" / "g.db").exists()


async def test_busy_timeout_is_configurable(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite+aiosqlite:///{tmp_path / 'g.db'}", busy_timeout_ms=2500)
    try:
        assert await pragma(engine, "busy_timeout") == 2500
    finally:
        await engine.dispose()


async def test_every_pooled_connection_gets_the_pragmas(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite+aiosqlite:///{tmp_path / 'g.db'}")
    try:
        async with engine.connect() as a, engine.connect() as b:
            for conn in (a, b):
                assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
    finally:
        await engine.dispose()


async def test_in_memory_sqlite_creates_no_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    engine = create_db_engine("sqlite+aiosqlite://")
    try:
        assert await pragma(engine, "foreign_keys") == 1
    finally:
        await engine.dispose()
    assert await asyncio.to_thread(lambda: list(tmp_path.iterdir())) == []


def test_url_helpers() -> None:
    assert is_sqlite("sqlite+aiosqlite:////data/gateway.db")
    assert sqlite_path("sqlite+aiosqlite:////data/gateway.db") == Path("/data/gateway.db")
    assert sqlite_path("sqlite+aiosqlite:///:memory:") is None
    assert sqlite_path("sqlite+aiosqlite://") is None
    assert not is_sqlite("postgresql+asyncpg://u:p@db/gateway")
    assert sqlite_path("postgresql+asyncpg://u:p@db/gateway") is None


async def test_objects_stay_usable_after_commit(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions() as session, session.begin():
        user = User(name="sbin", password_hash="x")
        session.add(user)
    # expire_on_commit=False: reading attributes after the session ended needs no database trip.
    assert user.id > 0
    assert user.name == "sbin"
    assert user.is_guest is False


async def seed_chat(session: AsyncSession, name: str) -> tuple[User, Character, Conversation]:
    user = User(name=name, password_hash="hash")
    session.add(user)
    await session.flush()
    session.add(AuthToken(user_id=user.id, token_hash="a" * 63 + name[-1]))
    character = Character(
        user_id=user.id, name="小雪", user_alias="哥哥", greeting="你好", persona="你扮演小雪。", avatar=None
    )
    session.add(character)
    await session.flush()
    conversation = Conversation(user_id=user.id, character_id=character.id)
    session.add(conversation)
    await session.flush()
    parent: ConversationNode | None = None
    for position, (role, text) in enumerate([("bot", "你好"), ("user", "在吗"), ("bot", "在的")]):
        node = ConversationNode(
            conversation_id=conversation.id,
            parent_id=None if parent is None else parent.id,
            position=position,
            role=role,
            text=text,
            state_key=f"state-{position}",
            token_count=10 * (position + 1),
        )
        session.add(node)
        await session.flush()
        parent = node
    assert parent is not None
    conversation.current_node_id = parent.id
    await session.flush()
    return user, character, conversation


async def counts(session: AsyncSession) -> dict[str, int]:
    result = {}
    for model in (User, AuthToken, Character, Conversation, ConversationNode):
        result[model.__tablename__] = await session.scalar(select(func.count()).select_from(model)) or 0
    return result


async def test_a_unit_of_work_keeps_only_what_it_commits(sessions: async_sessionmaker[AsyncSession]) -> None:
    storage = SqlStorage(sessions)
    async with storage.transaction() as uow:
        await uow.users.add("kept", None, is_guest=True)
        await uow.commit()
    async with storage.transaction() as uow:
        await uow.users.add("dropped", None, is_guest=True)  # flushed, never committed
    async with storage.transaction() as uow:
        assert [user.name for user in await uow.users.list(guests=True)] == ["kept"]


async def test_deleting_a_user_cascades(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions() as session, session.begin():
        doomed, _, _ = await seed_chat(session, "user-1")
        await seed_chat(session, "user-2")
    async with sessions() as session:
        assert await counts(session) == {
            "users": 2,
            "auth_tokens": 2,
            "characters": 2,
            "conversations": 2,
            "conversation_nodes": 6,
        }
    async with sessions() as session, session.begin():
        await session.delete(await session.get_one(User, doomed.id))
    async with sessions() as session:
        assert await counts(session) == {
            "users": 1,
            "auth_tokens": 1,
            "characters": 1,
            "conversations": 1,
            "conversation_nodes": 3,
        }
        assert await session.scalar(select(User.name)) == "user-2"


async def test_deleting_a_character_removes_its_conversations(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as session, session.begin():
        _, character, _ = await seed_chat(session, "user-1")
    async with sessions() as session, session.begin():
        await session.delete(await session.get_one(Character, character.id))
    async with sessions() as session:
        found = await counts(session)
    assert (found["users"], found["characters"], found["conversations"], found["conversation_nodes"]) == (
        1,
        0,
        0,
        0,
    )


async def test_rewinding_deletes_the_subtree_and_clears_the_pointer(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as session, session.begin():
        _, _, conversation = await seed_chat(session, "user-1")
    async with sessions() as session, session.begin():
        second = await session.scalar(
            select(ConversationNode).where(
                ConversationNode.conversation_id == conversation.id, ConversationNode.position == 1
            )
        )
        assert second is not None
        await session.delete(second)
    async with sessions() as session:
        kept = (await session.scalars(select(ConversationNode.position))).all()
        current = await session.scalar(select(Conversation.current_node_id))
    assert kept == [0]
    assert current is None


async def test_credentials_cascade_to_access_tokens(sessions: async_sessionmaker[AsyncSession]) -> None:
    expires = datetime.now(UTC) + timedelta(days=30)
    async with sessions() as session, session.begin():
        credential = ApiCredential(kind="baidu", api_key="test-ak", secret="test-sk", name="qianfan")
        session.add(credential)
        await session.flush()
        session.add(AccessToken(credential_id=credential.id, token_hash="b" * 64, expires_at=expires))
    async with sessions() as session, session.begin():
        token = await session.scalar(select(AccessToken))
        assert token is not None
        assert token.expires_at == expires
        await session.delete(await session.get_one(ApiCredential, credential.id))
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(AccessToken)) == 0


async def test_constraints_are_enforced(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions() as session, session.begin():
        user, _, _ = await seed_chat(session, "user-1")
    duplicate = Character(user_id=user.id, name="小雪", user_alias="u", greeting="g", persona="p")
    with pytest.raises(IntegrityError, match=r"UNIQUE|unique constraint"):
        async with sessions() as session, session.begin():
            session.add(duplicate)
    with pytest.raises(IntegrityError, match=r"CHECK|check constraint"):
        async with sessions() as session, session.begin():
            session.add(ApiCredential(kind="azure", api_key="k"))
    with pytest.raises(IntegrityError, match=r"FOREIGN KEY|foreign key constraint"):
        async with sessions() as session, session.begin():
            session.add(AuthToken(user_id=12345, token_hash="c" * 64))


async def test_timestamps_are_aware_utc(sessions: async_sessionmaker[AsyncSession]) -> None:
    tokyo = timezone(timedelta(hours=9))
    moment = datetime(2024, 5, 1, 21, 30, tzinfo=tokyo)
    async with sessions() as session, session.begin():
        session.add(User(name="guest", is_guest=True, last_seen_at=moment))
    async with sessions() as session:
        user = await session.scalar(select(User))
        assert user is not None
        assert user.last_seen_at == moment
        assert user.last_seen_at.tzinfo == UTC
        assert user.last_seen_at.hour == 12
        assert user.created_at.tzinfo == UTC
        idle = await session.scalar(select(func.count()).select_from(User).where(User.last_seen_at < moment))
        assert idle == 0
    with pytest.raises(StatementError, match="naive datetime"):
        async with sessions() as session, session.begin():
            await session.execute(update(User).values(last_seen_at=datetime(2024, 1, 1)))


async def test_updated_at_moves_on_update(sessions: async_sessionmaker[AsyncSession]) -> None:
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    async with sessions() as session, session.begin():
        _, character, _ = await seed_chat(session, "user-1")
        character.updated_at = long_ago
    async with sessions() as session, session.begin():
        row = await session.get_one(Character, character.id)
        assert row.updated_at == long_ago
        row.greeting = "早上好"
    assert row.updated_at > long_ago
    assert row.created_at < row.updated_at or row.created_at == row.updated_at


#: Transactions racing on one row.
WRITERS = 12


async def test_concurrent_revokes_of_one_credential_revoke_it_once(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """Two replicas (or two admins) revoking the same key at once: exactly one revoke happens."""
    storage = SqlStorage(sessions)
    async with storage.transaction() as uow:
        credential = await uow.credentials.add(kind="openai", api_key="sk-race", secret=None, name="race")
        await uow.commit()

    async def revoke() -> bool:
        async with storage.transaction() as uow:
            done = await uow.credentials.revoke(credential.id, datetime.now(UTC))
            await uow.commit()
            return done

    results = await asyncio.gather(*(revoke() for _ in range(WRITERS)))
    assert sorted(results) == [False] * (WRITERS - 1) + [True]


async def test_concurrent_logins_leave_one_token(sessions: async_sessionmaker[AsyncSession]) -> None:
    """Logging in again replaces the user's token; logins racing (on two replicas) leave exactly one."""
    storage = SqlStorage(sessions)
    async with storage.transaction() as uow:
        user = await uow.users.add("racer", None, is_guest=False)
        await uow.commit()

    async def login(i: int) -> None:
        async with storage.transaction() as uow:
            await uow.users.replace_token(user.id, f"{i:064x}")
            await uow.commit()

    await asyncio.gather(*(login(i) for i in range(WRITERS)))
    async with sessions() as session:
        tokens = (
            await session.scalars(select(AuthToken.token_hash).where(AuthToken.user_id == user.id))
        ).all()
    assert len(tokens) == 1


async def test_concurrent_turns_on_one_conversation_land_once(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """Two replicas finishing a turn of the same chat at once: the turn's check that the chat did not
    move on holds under the conversation's lock, so exactly one turn lands and the tree stays a path."""
    async with sessions() as session, session.begin():
        _, _, conversation = await seed_chat(session, "user-1")
    storage = SqlStorage(sessions)
    after = conversation.current_node_id

    async def turn(i: int) -> bool:
        async with storage.transaction() as uow:
            chat = await uow.conversations.get_by_id(conversation.id, lock=True)
            assert chat is not None
            if chat.current_node_id != after:
                return False
            node = await uow.conversations.add_node(
                NewNode(conversation.id, after, 3, "user", f"turn {i}", f"turn {i}", None, 40)
            )
            await uow.conversations.set_current(conversation.id, node.id)
            await uow.commit()
            return True

    # Open a connection for each turn first, so none gets a head start while the others connect.
    opened = asyncio.Barrier(WRITERS)

    async def connect() -> None:
        async with engine.connect() as conn:  # a plain connection: on SQLite, no write lock
            await conn.execute(select(1))
            await opened.wait()

    await asyncio.gather(*(connect() for _ in range(WRITERS)))
    results = await asyncio.gather(*(turn(i) for i in range(WRITERS)))
    assert sorted(results) == [False] * (WRITERS - 1) + [True]
    async with sessions() as session:
        query = select(func.count()).select_from(ConversationNode).where(ConversationNode.parent_id == after)
        assert await session.scalar(query) == 1
