"""Task API: the `tasks` table of persistent tasks and templates.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 07:50:00

Temporary tasks never reach the database. A row's state snapshot lives in the engine's state store
(`state_key`); the row keeps the generation parameters, the tokens not yet in the snapshot, the
generated text and its piece boundaries. See `rwkv_gateway.db.models.TaskRecord`.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("state_key", sa.String(length=255), nullable=True),
        sa.Column("pending_tokens", sa.Text(), nullable=False),
        sa.Column("result", sa.Text(), nullable=False),
        sa.Column("piece_ends", sa.Text(), nullable=False),
        sa.Column("prefill_time", sa.Float(), nullable=False),
        sa.Column("gen_time", sa.Float(), nullable=False),
        sa.Column("generated_tokens", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("kind IN ('task', 'template')", name=op.f("ck_tasks_kind")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
        sa.UniqueConstraint("task_id", name=op.f("uq_tasks_task_id")),
    )
    op.create_index(op.f("ix_tasks_updated_at"), "tasks", ["updated_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_tasks_updated_at"), table_name="tasks")
    op.drop_table("tasks")
