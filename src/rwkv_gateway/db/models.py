"""The ORM tables: accounts and their tokens, role-play cards, conversations and their nodes, API
credentials with the access tokens issued for them, and the request log.

Alembic owns the schema (`migrations/` at the repository root); these classes must match the latest
migration, which a test checks with Alembic's autogenerate comparison. Primary keys are integers throughout,
timestamps are aware UTC datetimes, secrets that are only ever compared are stored as SHA-256 hex
digests, and child rows go away with their parent through `ON DELETE CASCADE` in the database (SQLite
enforces it because every connection turns `foreign_keys` on), so no ORM relationship is needed to
delete a user or a conversation.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column

from rwkv_gateway.db.base import Base, utcnow

__all__ = [
    "AccessToken",
    "ApiCredential",
    "AuthToken",
    "Base",
    "Character",
    "Conversation",
    "ConversationNode",
    "RequestLogEntry",
    "TaskRecord",
    "User",
]

#: Longest user or character name (1-64 characters after NFC: docs/roleplay.md#7-names).
NAME_LEN = 64
#: A SHA-256 hex digest.
DIGEST_LEN = 64
#: A key into the engine's state store.
STATE_KEY_LEN = 255

NODE_ROLES = ("user", "bot", "system")
CREDENTIAL_KINDS = ("baidu", "openai")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class User(Base):
    """An account: a named user with a password, or a guest (`tmp-<hex>`, no password)."""

    __tablename__ = "users"
    __table_args__ = (
        # Guest cleanup scans idle guests (docs/roleplay.md#8-guests).
        Index("ix_users_is_guest_last_seen_at", "is_guest", "last_seen_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    #: A password hash in its own self-describing format (e.g. Argon2id); NULL for guests.
    password_hash: Mapped[str | None] = mapped_column(String(255))
    is_guest: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: Last successful authenticated request.
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: The default role-play characters were given to this user (once; migration 0002).
    defaults_given: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class AuthToken(Base):
    """A login token of a user, stored as the SHA-256 hex digest of the token the client holds."""

    __tablename__ = "auth_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(DIGEST_LEN), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: NULL: valid until replaced (the role-play API's tokens never expire by time).
    expires_at: Mapped[datetime | None] = mapped_column()


class Character(Base):
    """A user's role-play character card.

    Card fields of the role-play API (`/characters/save`, `/characters/get`) map onto columns so:
    `bot` -> `name` (the key of the card, its chat and its states: docs/roleplay.md#9-characters),
    `user` -> `user_alias` (what the character calls the user), `greeting` -> `greeting`, `bot_persona`
    -> `persona`, `example_message` -> `example_message` (absent/null/"null"/"undefined" are stored as ""),
    `use_qa` -> `use_qa`, `avatar` -> `avatar` (a data URL; NULL when the card has none).
    """

    __tablename__ = "characters"
    __table_args__ = (UniqueConstraint("user_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN))
    user_alias: Mapped[str] = mapped_column(Text)
    greeting: Mapped[str] = mapped_column(Text)
    persona: Mapped[str] = mapped_column(Text)
    example_message: Mapped[str] = mapped_column(Text, default="")
    use_qa: Mapped[bool] = mapped_column(Boolean, default=False)
    avatar: Mapped[str | None] = mapped_column(Text)
    #: The cached persona state (prompt block + greeting prefilled) in the engine's state store.
    persona_state_key: Mapped[str | None] = mapped_column(String(STATE_KEY_LEN))
    #: Fields of an imported character card this table has no column for, as a JSON object, so that
    #: exporting the card again keeps them (migration 0002).
    card_extra: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Conversation(Base):
    """A user's chat with one character: a tree of nodes and a pointer to the node the chat is at."""

    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    character_id: Mapped[int] = mapped_column(ForeignKey("characters.id", ondelete="CASCADE"), index=True)
    #: The last node of the visible history. `use_alter` because the two tables point at each other:
    #: PostgreSQL needs this key added after both tables exist.
    current_node_id: Mapped[int | None] = mapped_column(
        ForeignKey("conversation_nodes.id", ondelete="SET NULL", use_alter=True)
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ConversationNode(Base):
    """One turn of a conversation: a user message, a bot reply or a system block.

    Nodes form a tree through `parent_id`, so regenerate and rewind keep earlier branches until the
    service prunes them (deleting a node deletes its subtree). `state_key` names the engine state
    right after this node's text: after a user node that is the pre-reply state (ending in
    "{bot}:"), after a bot node the state the next turn starts from, which is what makes rewind,
    regenerate and "say it for the character" free of re-prefill. `position` is the node's depth in
    its path (0 = the greeting or first node).
    """

    __tablename__ = "conversation_nodes"
    __table_args__ = (
        CheckConstraint(_one_of("role", NODE_ROLES), name="role"),
        Index("ix_conversation_nodes_conversation_id_position", "conversation_id", "position"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("conversation_nodes.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)
    state_key: Mapped[str | None] = mapped_column(String(STATE_KEY_LEN))
    #: Tokens the state after this node has consumed since the empty state (`/debug/token`).
    token_count: Mapped[int] = mapped_column(Integer, default=0)
    #: The exact text this node fed to the model (e.g. `"{user}: {prompt}\n\n{bot}:"` for a user turn,
    #: the untrimmed reply and its `"\n\n"` for a bot node), so the whole context can be shown or
    #: prefilled again; `text` is what the client sees (migration 0002).
    context_text: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiCredential(Base):
    """An API credential: a Baidu AK/SK pair or an OpenAI-style API key.

    `secret` holds the Baidu Secret Key as given, not hashed: `bce-auth-v1` request signatures are
    HMACs keyed by the SK itself, so the server must be able to recompute them. NULL for kinds
    without a secret. For "openai" credentials the key is itself the secret; the credentials service
    decides whether `api_key` holds it or its SHA-256 digest.
    """

    __tablename__ = "api_credentials"
    __table_args__ = (CheckConstraint(_one_of("kind", CREDENTIAL_KINDS), name="kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    api_key: Mapped[str] = mapped_column(String(255), unique=True)
    secret: Mapped[str | None] = mapped_column(Text)
    name: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()


class AccessToken(Base):
    """An access token issued for a credential (Baidu `/oauth/2.0/token`), stored as a SHA-256 hex digest."""

    __tablename__ = "access_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    credential_id: Mapped[int] = mapped_column(
        ForeignKey("api_credentials.id", ondelete="CASCADE"), index=True
    )
    token_hash: Mapped[str] = mapped_column(String(DIGEST_LEN), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()


class RequestLogEntry(Base):
    """One finished generation (a `RequestRecord`): who asked through which dialect, tokens, latency."""

    __tablename__ = "request_log"

    # BIGINT where the backend has it (the log only grows); SQLite only auto-assigns INTEGER keys.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128))
    dialect: Mapped[str] = mapped_column(String(32), index=True)
    user: Mapped[str | None] = mapped_column(String(255))
    api_key_id: Mapped[str | None] = mapped_column(String(255))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    total_ms: Mapped[float] = mapped_column(Float)
    finish_reason: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(index=True)


# ---------------------------------------------------------------------------- Task API

TASK_KINDS = ("task", "template")


class TaskRecord(Base):
    """A persistent Task API task (`TASK_...`) or template (`_TMPL_...`); temporary tasks live in RAM only.

    The RNN state itself is a persisted snapshot in the engine's state store under `state_key`
    (NULL: the empty state). `pending_tokens` (a JSON list of token ids) are tokens the task has
    consumed that the snapshot does not hold yet (after a stop mid-generation); the next generation
    feeds them first. `result` is the generated text since the last re-prompt and `piece_ends` (a
    JSON list of offsets into it) splits it into the pieces that stream positions (`pos`) count.
    `params` is the task's generation parameters as JSON.
    """

    __tablename__ = "tasks"
    __table_args__ = (CheckConstraint(_one_of("kind", TASK_KINDS), name="kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    params: Mapped[str] = mapped_column(Text)
    state_key: Mapped[str | None] = mapped_column(String(STATE_KEY_LEN))
    pending_tokens: Mapped[str] = mapped_column(Text, default="[]")
    result: Mapped[str] = mapped_column(Text, default="")
    piece_ends: Mapped[str] = mapped_column(Text, default="[]")
    prefill_time: Mapped[float] = mapped_column(Float, default=0.0)
    gen_time: Mapped[float] = mapped_column(Float, default=0.0)
    generated_tokens: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow, index=True)
