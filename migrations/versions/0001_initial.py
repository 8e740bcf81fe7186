"""Initial schema: users, tokens, characters, conversations, credentials and the request log.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00

Written by hand and checked against the models by `tests/db/test_db_migrations.py`. Constraint
names follow `rwkv_gateway.db.base.NAMING_CONVENTION` and are wrapped in `op.f()` so that convention
does not rewrite them again. `conversations.current_node_id` and
`conversation_nodes.conversation_id` point at each other: SQLite accepts the forward reference
inline (it checks references only when rows change), other backends get that key once both tables
exist.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CURRENT_NODE_FK = "fk_conversations_current_node_id_conversation_nodes"


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _inline_forward_keys() -> bool:
    return op.get_context().dialect.name == "sqlite"


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=True),
        sa.Column("is_guest", sa.Boolean(), nullable=False),
        _ts("created_at"),
        _ts("last_seen_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
    )
    op.create_index(op.f("ix_users_is_guest_last_seen_at"), "users", ["is_guest", "last_seen_at"])

    op.create_table(
        "auth_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        _ts("created_at"),
        _ts("expires_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_auth_tokens_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_auth_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_auth_tokens_token_hash")),
    )
    op.create_index(op.f("ix_auth_tokens_user_id"), "auth_tokens", ["user_id"])

    op.create_table(
        "characters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("user_alias", sa.Text(), nullable=False),
        sa.Column("greeting", sa.Text(), nullable=False),
        sa.Column("persona", sa.Text(), nullable=False),
        sa.Column("example_message", sa.Text(), nullable=False),
        sa.Column("use_qa", sa.Boolean(), nullable=False),
        sa.Column("avatar", sa.Text(), nullable=True),
        sa.Column("persona_state_key", sa.String(length=255), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_characters_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_characters")),
        sa.UniqueConstraint("user_id", "name", name=op.f("uq_characters_user_id_name")),
    )
    op.create_index(op.f("ix_characters_user_id"), "characters", ["user_id"])

    forward_keys: list[sa.ForeignKeyConstraint] = []
    if _inline_forward_keys():
        forward_keys.append(
            sa.ForeignKeyConstraint(
                ["current_node_id"],
                ["conversation_nodes.id"],
                name=op.f(CURRENT_NODE_FK),
                ondelete="SET NULL",
            )
        )
    op.create_table(
        "conversations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("character_id", sa.Integer(), nullable=False),
        sa.Column("current_node_id", sa.Integer(), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_conversations_user_id_users"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["character_id"],
            ["characters.id"],
            name=op.f("fk_conversations_character_id_characters"),
            ondelete="CASCADE",
        ),
        *forward_keys,
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversations")),
    )
    op.create_index(op.f("ix_conversations_user_id"), "conversations", ["user_id"])
    op.create_index(op.f("ix_conversations_character_id"), "conversations", ["character_id"])

    op.create_table(
        "conversation_nodes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("conversation_id", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("state_key", sa.String(length=255), nullable=True),
        sa.Column("token_count", sa.Integer(), nullable=False),
        _ts("created_at"),
        sa.CheckConstraint("role IN ('user', 'bot', 'system')", name=op.f("ck_conversation_nodes_role")),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_conversation_nodes_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["conversation_nodes.id"],
            name=op.f("fk_conversation_nodes_parent_id_conversation_nodes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversation_nodes")),
    )
    op.create_index(
        op.f("ix_conversation_nodes_conversation_id_position"),
        "conversation_nodes",
        ["conversation_id", "position"],
    )
    op.create_index(op.f("ix_conversation_nodes_parent_id"), "conversation_nodes", ["parent_id"])
    if not _inline_forward_keys():
        op.create_foreign_key(
            op.f(CURRENT_NODE_FK),
            "conversations",
            "conversation_nodes",
            ["current_node_id"],
            ["id"],
            ondelete="SET NULL",
        )

    op.create_table(
        "api_credentials",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("api_key", sa.String(length=255), nullable=False),
        sa.Column("secret", sa.Text(), nullable=True),
        sa.Column("name", sa.String(length=255), nullable=False),
        _ts("created_at"),
        _ts("revoked_at", nullable=True),
        sa.CheckConstraint("kind IN ('baidu', 'openai')", name=op.f("ck_api_credentials_kind")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_credentials")),
        sa.UniqueConstraint("api_key", name=op.f("uq_api_credentials_api_key")),
    )

    op.create_table(
        "access_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("credential_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        _ts("created_at"),
        _ts("expires_at"),
        _ts("revoked_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["credential_id"],
            ["api_credentials.id"],
            name=op.f("fk_access_tokens_credential_id_api_credentials"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_access_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_access_tokens_token_hash")),
    )
    op.create_index(op.f("ix_access_tokens_credential_id"), "access_tokens", ["credential_id"])

    op.create_table(
        "request_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("dialect", sa.String(length=32), nullable=False),
        sa.Column("user", sa.String(length=255), nullable=True),
        sa.Column("api_key_id", sa.String(length=255), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        sa.Column("total_ms", sa.Float(), nullable=False),
        sa.Column("finish_reason", sa.String(length=32), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_request_log")),
    )
    op.create_index(op.f("ix_request_log_created_at"), "request_log", ["created_at"])
    op.create_index(op.f("ix_request_log_dialect"), "request_log", ["dialect"])


def downgrade() -> None:
    op.drop_index(op.f("ix_request_log_dialect"), table_name="request_log")
    op.drop_index(op.f("ix_request_log_created_at"), table_name="request_log")
    op.drop_table("request_log")

    op.drop_index(op.f("ix_access_tokens_credential_id"), table_name="access_tokens")
    op.drop_table("access_tokens")
    op.drop_table("api_credentials")

    if not _inline_forward_keys():
        op.drop_constraint(op.f(CURRENT_NODE_FK), "conversations", type_="foreignkey")
    op.drop_index(op.f("ix_conversation_nodes_parent_id"), table_name="conversation_nodes")
    op.drop_index(op.f("ix_conversation_nodes_conversation_id_position"), table_name="conversation_nodes")
    op.drop_table("conversation_nodes")
    op.drop_index(op.f("ix_conversations_character_id"), table_name="conversations")
    op.drop_index(op.f("ix_conversations_user_id"), table_name="conversations")
    op.drop_table("conversations")

    op.drop_index(op.f("ix_characters_user_id"), table_name="characters")
    op.drop_table("characters")
    op.drop_index(op.f("ix_auth_tokens_user_id"), table_name="auth_tokens")
    op.drop_table("auth_tokens")
    op.drop_index(op.f("ix_users_is_guest_last_seen_at"), table_name="users")
    op.drop_table("users")
