"""Telemetry kept past the retention, downsampled: one row per device and hour (``telemetry_hourly``).

The retention sweep deletes raw windows older than ``telemetry_retention_days``; before it deletes them it adds
them to their device's hourly row (windows, inputs, offloaded and fallback inputs, the worst edge and cloud p95,
windows that flagged drift), so the long-term trend of a device survives its raw windows.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "telemetry_hourly",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("hour", sa.Integer, nullable=False),
        sa.Column("windows", sa.Integer, nullable=False),
        sa.Column("inputs", sa.Integer, nullable=False),
        sa.Column("offloaded", sa.Float, nullable=False),
        sa.Column("fallbacks", sa.Float, nullable=False),
        sa.Column("edge_p95_max", sa.Float, nullable=True),
        sa.Column("cloud_p95_max", sa.Float, nullable=True),
        sa.Column("drift_windows", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("device_id", "hour", name="pk_telemetry_hourly"),
    )


def downgrade() -> None:
    op.drop_table("telemetry_hourly")
