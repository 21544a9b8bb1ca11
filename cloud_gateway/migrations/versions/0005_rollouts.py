"""Staged rollouts: one row per rollout (its state survives a gateway restart) and its timeline of steps.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("bundle", sa.String(128), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
        sa.Column("plan", sa.JSON, nullable=False),  # canaries, rest, previous versions, watch, condition, urls
        sa.Column("baseline", sa.JSON),
        sa.Column("result", sa.JSON),
    )
    op.create_table(
        "rollout_steps",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("rollout_id", sa.Integer, sa.ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("step", sa.String(64), nullable=False),
        sa.Column("detail", sa.JSON),
    )
    op.create_index("ix_rollout_steps_rollout_id", "rollout_steps", ["rollout_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_rollout_steps_rollout_id", table_name="rollout_steps")
    op.drop_table("rollout_steps")
    op.drop_table("rollouts")
