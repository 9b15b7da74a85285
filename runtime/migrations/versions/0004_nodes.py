"""nodes: the processes holding connections' sessions, and each session's node

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from runtime.models import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("seen_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.add_column("sessions", sa.Column("node_id", sa.String(length=32), nullable=True))
    op.create_index("ix_sessions_node_active", "sessions", ["node_id", "ended_at"])


def downgrade() -> None:
    op.drop_index("ix_sessions_node_active", table_name="sessions")
    op.drop_column("sessions", "node_id")
    op.drop_table("nodes")
