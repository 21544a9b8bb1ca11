"""Baseline: the store as `create_all` made it before migrations (devices, telemetry unique on device+seq).

A database that has these tables but no ``alembic_version`` is stamped with
this revision and upgraded from here.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("status", sa.JSON), sa.Column("status_time", sa.Float),
        sa.Column("last_telemetry", sa.JSON), sa.Column("last_seen", sa.Float),
    )
    op.create_table(
        "telemetry",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("t_end", sa.Float), sa.Column("received", sa.Float, nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.UniqueConstraint("device_id", "seq", name="uq_device_seq"),
    )
    op.create_index("ix_telemetry_device_id", "telemetry", ["device_id"])


def downgrade() -> None:
    op.drop_table("telemetry")
    op.drop_table("devices")
