"""Refresh policy: the policy document and the proposals (or runs) it fired, with why.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "policy",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("doc", sa.JSON, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
    )
    op.create_table(
        "proposals",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("reason", sa.JSON, nullable=False),
        sa.Column("result", sa.JSON),
    )


def downgrade() -> None:
    op.drop_table("proposals")
    op.drop_table("policy")
