"""Role-play additions: defaults-given flag on users, card extra fields, node context text.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 07:40:00

`users.defaults_given` records that a user has received the default characters (they are given once
and never overwrite edits). `characters.card_extra` keeps the fields of an imported character card
that have no column (a JSON object), so an export round-trips them. `conversation_nodes.context_text`
is the exact text a node fed to the model, as opposed to the displayed `text`.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "users", sa.Column("defaults_given", sa.Boolean(), server_default=sa.false(), nullable=False)
    )
    op.add_column("characters", sa.Column("card_extra", sa.Text(), nullable=True))
    op.add_column("conversation_nodes", sa.Column("context_text", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("conversation_nodes") as batch:
        batch.drop_column("context_text")
    with op.batch_alter_table("characters") as batch:
        batch.drop_column("card_extra")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("defaults_given")
