"""Repositories: the queries of each table behind small classes that take an open `AsyncSession`,
and `SqlUnitOfWork`, which carries all of them on one session (the domain's unit of work).

Repositories only add, query and `flush`; they never commit or roll back. The service that opened
the unit of work owns the transaction, so one use case commits all of its writes together or none
(docs/architecture.md#layers).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Result, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from rwkv_gateway.db.models import (
    AccessToken,
    ApiCredential,
    AuthToken,
    Character,
    Conversation,
    ConversationNode,
    RequestLogEntry,
    User,
)
from rwkv_gateway.db.task_repo import TaskRepo
from rwkv_gateway.domain.roleplay_store import CardFields, NewNode
from rwkv_gateway.domain.storage import utcnow
from rwkv_gateway.domain.types import RequestRecord

_Row = TypeVar("_Row", Character, Conversation, User)


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


class CredentialRepo:
    """Rows of `api_credentials`: API keys and AK/SK pairs, looked up by their stored key value.

    What `api_key` holds is the credentials service's business (a Baidu AK as is, an OpenAI key as a
    digest); this class only matches values it is given.
    """

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(
        self, kind: str, api_key: str, secret: str | None, name: str, *, created_at: datetime | None = None
    ) -> ApiCredential:
        credential = ApiCredential(kind=kind, api_key=api_key, secret=secret, name=name)
        if created_at is not None:
            credential.created_at = created_at
        self.session.add(credential)
        await self.session.flush()
        return credential

    async def get(self, credential_id: int) -> ApiCredential | None:
        return await self.session.get(ApiCredential, credential_id)

    async def get_by_key(
        self, kind: str, key_value: str, *, active_only: bool = False
    ) -> ApiCredential | None:
        """The credential of `kind` whose stored `api_key` equals `key_value`."""
        query = select(ApiCredential).where(ApiCredential.kind == kind, ApiCredential.api_key == key_value)
        if active_only:
            query = query.where(ApiCredential.revoked_at.is_(None))
        return (await self.session.scalars(query)).one_or_none()

    async def find_active_by_key_prefix(self, prefix: str) -> Sequence[ApiCredential]:
        """Active credentials whose stored `api_key` starts with `prefix` (taken literally, no wildcards)."""
        query = (
            select(ApiCredential)
            .where(
                ApiCredential.api_key.startswith(prefix, autoescape=True), ApiCredential.revoked_at.is_(None)
            )
            .order_by(ApiCredential.id)
        )
        return (await self.session.scalars(query)).all()

    async def list(
        self, kind: str | None = None, *, include_revoked: bool = False
    ) -> Sequence[ApiCredential]:
        """Credentials in creation order, optionally of one kind, revoked ones only when asked."""
        query = select(ApiCredential)
        if kind is not None:
            query = query.where(ApiCredential.kind == kind)
        if not include_revoked:
            query = query.where(ApiCredential.revoked_at.is_(None))
        return (await self.session.scalars(query.order_by(ApiCredential.id))).all()

    async def count_active(self, kind: str) -> int:
        query = (
            select(func.count())
            .select_from(ApiCredential)
            .where(ApiCredential.kind == kind, ApiCredential.revoked_at.is_(None))
        )
        return (await self.session.scalar(query)) or 0

    async def revoke(self, credential_id: int, at: datetime) -> bool:
        """Mark an active credential and every live token issued for it revoked; False if it was not active.

        Rows are kept (not deleted) so the request log's key ids stay explainable.
        """
        result = await self.session.execute(
            update(ApiCredential)
            .where(ApiCredential.id == credential_id, ApiCredential.revoked_at.is_(None))
            .values(revoked_at=at)
        )
        if not _rowcount(result):
            return False
        await self.session.execute(
            update(AccessToken)
            .where(AccessToken.credential_id == credential_id, AccessToken.revoked_at.is_(None))
            .values(revoked_at=at)
        )
        await self.session.flush()
        return True


class AccessTokenRepo:
    """Rows of `access_tokens`: tokens issued for a credential, found by the digest of the token."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(
        self, credential_id: int, token_hash: str, *, created_at: datetime, expires_at: datetime
    ) -> AccessToken:
        token = AccessToken(
            credential_id=credential_id, token_hash=token_hash, created_at=created_at, expires_at=expires_at
        )
        self.session.add(token)
        await self.session.flush()
        return token

    async def get_with_credential(self, token_hash: str) -> tuple[AccessToken, ApiCredential] | None:
        """The token with this digest and the credential it was issued for, in one query."""
        query = (
            select(AccessToken, ApiCredential)
            .join(ApiCredential, AccessToken.credential_id == ApiCredential.id)
            .where(AccessToken.token_hash == token_hash)
        )
        row = (await self.session.execute(query)).one_or_none()
        return None if row is None else (row[0], row[1])

    async def revoke(self, token_id: int, at: datetime) -> None:
        await self.session.execute(
            update(AccessToken)
            .where(AccessToken.id == token_id, AccessToken.revoked_at.is_(None))
            .values(revoked_at=at)
        )
        await self.session.flush()


def _rowcount(result: Result[Any]) -> int:
    # DML results are CursorResults at runtime; `Session.execute` is typed as returning a plain Result.
    return int(getattr(result, "rowcount", 0) or 0)


# ---------------------------------------------------------------------------- role-play


class UserRepo:
    """Rows of `users` (accounts and guests) and their login tokens in `auth_tokens`."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get_by_name(self, name: str) -> User | None:
        return (await self.session.scalars(select(User).where(User.name == name))).one_or_none()

    async def add(self, name: str, password_hash: str | None, *, is_guest: bool) -> User:
        user = User(name=name, password_hash=password_hash, is_guest=is_guest)
        self.session.add(user)
        await self.session.flush()
        return user

    async def list(self, *, guests: bool = False) -> Sequence[User]:
        query = select(User)
        if not guests:
            query = query.where(User.is_guest.is_(False))
        return (await self.session.scalars(query.order_by(User.name))).all()

    async def delete(self, user_id: int) -> None:
        user = await self.session.get(User, user_id)
        if user is not None:
            await self.session.delete(user)
            await self.session.flush()

    async def idle_guests(self, before: datetime) -> Sequence[User]:
        query = select(User).where(User.is_guest.is_(True), User.last_seen_at < before).order_by(User.id)
        return (await self.session.scalars(query)).all()

    async def token_hash(self, user_id: int) -> str | None:
        """The digest of the user's current token (one per user); None when it has none."""
        query = (
            select(AuthToken.token_hash)
            .where(AuthToken.user_id == user_id)
            .order_by(AuthToken.id.desc())
            .limit(1)
        )
        return (await self.session.scalars(query)).first()

    async def replace_token(self, user_id: int, token_hash: str) -> None:
        """Make `token_hash` the user's only token (logging in again invalidates the previous one)."""
        # Logins racing on several replicas: lock the user's row first, or on PostgreSQL each one's
        # DELETE misses the tokens the others insert and they all stay (SQLite's write lock at BEGIN
        # already serialises them; it has no FOR UPDATE and SQLAlchemy leaves it out there).
        await self.session.execute(select(User.id).where(User.id == user_id).with_for_update())
        await self.session.execute(delete(AuthToken).where(AuthToken.user_id == user_id))
        self.session.add(AuthToken(user_id=user_id, token_hash=token_hash))
        await self.session.flush()

    async def set_password(self, user_id: int, password_hash: str) -> None:
        (await _existing(self.session, User, user_id)).password_hash = password_hash
        await self.session.flush()

    async def set_defaults_given(self, user_id: int) -> None:
        (await _existing(self.session, User, user_id)).defaults_given = True
        await self.session.flush()

    async def set_last_seen(self, user_id: int, at: datetime) -> None:
        (await _existing(self.session, User, user_id)).last_seen_at = at
        await self.session.flush()


async def _existing(session: AsyncSession, table: type[_Row], row_id: int) -> _Row:
    """The row `row_id` of a table; the services change only rows they have just read."""
    row = await session.get(table, row_id)
    if row is None:
        raise LookupError(f"no {table.__name__} {row_id}")
    return row


def _fill_card(character: Character, card: CardFields) -> None:
    character.user_alias = card.user
    character.greeting = card.greeting
    character.persona = card.bot_persona
    character.example_message = card.example_message
    character.use_qa = card.use_qa
    character.avatar = card.avatar


class CharacterRepo:
    """A user's role-play characters (`characters`), keyed by (user, name)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def list(self, user_id: int) -> Sequence[Character]:
        query = select(Character).where(Character.user_id == user_id)
        return (await self.session.scalars(query)).all()

    async def get(self, user_id: int, name: str) -> Character | None:
        query = select(Character).where(Character.user_id == user_id, Character.name == name)
        return (await self.session.scalars(query)).one_or_none()

    async def add(self, user_id: int, card: CardFields) -> Character:
        character = Character(user_id=user_id, name=card.bot)
        _fill_card(character, card)
        self.session.add(character)
        await self.session.flush()
        return character

    async def update(self, character_id: int, card: CardFields) -> None:
        _fill_card(await _existing(self.session, Character, character_id), card)
        await self.session.flush()

    async def set_card_extra(self, character_id: int, extra: str | None) -> None:
        (await _existing(self.session, Character, character_id)).card_extra = extra
        await self.session.flush()

    async def set_persona_key(self, character_id: int, key: str | None) -> None:
        (await _existing(self.session, Character, character_id)).persona_state_key = key
        await self.session.flush()

    async def delete(self, character_id: int) -> None:
        await self.session.delete(await _existing(self.session, Character, character_id))
        await self.session.flush()

    async def count_persona_key(self, key: str) -> int:
        """How many characters (of any user) share this cached persona state."""
        query = select(func.count()).select_from(Character).where(Character.persona_state_key == key)
        return (await self.session.scalar(query)) or 0


class ConversationRepo:
    """Conversations (one per user and character) and their nodes, read as the path to the current node."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, user_id: int, character_id: int) -> Conversation | None:
        query = (
            select(Conversation)
            .where(Conversation.user_id == user_id, Conversation.character_id == character_id)
            .order_by(Conversation.id)
            .limit(1)
        )
        return (await self.session.scalars(query)).first()

    async def get_by_id(self, conversation_id: int, *, lock: bool = False) -> Conversation | None:
        # FOR UPDATE (PostgreSQL; SQLite's write lock taken at BEGIN does the same) holds other
        # replicas' writers of this conversation until this transaction ends.
        return await self.session.get(Conversation, conversation_id, with_for_update=True if lock else None)

    async def add(self, user_id: int, character_id: int) -> Conversation:
        conversation = Conversation(user_id=user_id, character_id=character_id)
        self.session.add(conversation)
        await self.session.flush()
        return conversation

    async def set_current(self, conversation_id: int, node_id: int) -> None:
        conversation = await _existing(self.session, Conversation, conversation_id)
        conversation.current_node_id = node_id
        conversation.updated_at = utcnow()
        await self.session.flush()

    async def nodes(self, conversation_id: int) -> Sequence[ConversationNode]:
        """Every node of the conversation in path order (role-play keeps one linear path)."""
        query = (
            select(ConversationNode)
            .where(ConversationNode.conversation_id == conversation_id)
            .order_by(ConversationNode.position, ConversationNode.id)
        )
        return (await self.session.scalars(query)).all()

    async def add_node(self, new: NewNode) -> ConversationNode:
        node = ConversationNode(
            conversation_id=new.conversation_id,
            parent_id=new.parent_id,
            position=new.position,
            role=new.role,
            text=new.text,
            context_text=new.context_text,
            state_key=new.state_key,
            token_count=new.token_count,
        )
        self.session.add(node)
        await self.session.flush()
        return node

    async def rewrite_node(
        self, node_id: int, *, text: str, context_text: str, state_key: str, token_count: int
    ) -> bool:
        node = await self.session.get(ConversationNode, node_id)
        if node is None:
            return False
        node.text = text
        node.context_text = context_text
        node.state_key = state_key
        node.token_count = token_count
        await self.session.flush()
        return True

    async def delete_nodes(self, conversation_id: int, node_ids: Iterable[int]) -> None:
        ids = list(node_ids)
        if not ids:
            return
        conversation = await _existing(self.session, Conversation, conversation_id)
        if conversation.current_node_id in ids:
            conversation.current_node_id = None
            await self.session.flush()
        await self.session.execute(delete(ConversationNode).where(ConversationNode.id.in_(ids)))
        await self.session.flush()

    async def delete(self, conversation_id: int) -> None:
        conversation = await _existing(self.session, Conversation, conversation_id)
        conversation.current_node_id = None
        await self.session.flush()
        await self.session.execute(
            delete(ConversationNode).where(ConversationNode.conversation_id == conversation.id)
        )
        await self.session.delete(conversation)
        await self.session.flush()

    async def state_keys_of_user(self, user_id: int) -> list[str]:
        """State-store keys of every node of the user's conversations (to delete with the user)."""
        query = (
            select(ConversationNode.state_key)
            .join(Conversation, ConversationNode.conversation_id == Conversation.id)
            .where(Conversation.user_id == user_id, ConversationNode.state_key.is_not(None))
        )
        return [k for k in (await self.session.scalars(query)).all() if k is not None]


# ---------------------------------------------------------------------------- unit of work


class SqlUnitOfWork:
    """One session and every repository on it: the unit of work of `domain/storage.py`, which has
    the repositories each service's unit protocol names (`db/session.py`'s `SqlStorage` opens it)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.users = UserRepo(session)
        self.characters = CharacterRepo(session)
        self.conversations = ConversationRepo(session)
        self.credentials = CredentialRepo(session)
        self.access_tokens = AccessTokenRepo(session)
        self.request_log = RequestLogRepo(session)
        self.tasks = TaskRepo(session)

    async def commit(self) -> None:
        await self.session.commit()
