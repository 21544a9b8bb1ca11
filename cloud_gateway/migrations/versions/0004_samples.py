"""Collected samples: offloaded inputs with the teacher's answer (opt-in collection, labelling queue).

The columns `edgecore.samples.SAMPLE_COLUMNS` names are the contract `toolchain refresh` reads.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "samples",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("bundle", sa.String(128), nullable=False, server_default=""),
        sa.Column("received", sa.Float, nullable=False),
        sa.Column("input", sa.LargeBinary, nullable=False),
        sa.Column("teacher_probs", sa.LargeBinary, nullable=False),
        sa.Column("teacher_label", sa.Integer, nullable=False),
        sa.Column("uncertainty", sa.Float, nullable=False),
        sa.Column("confidence", sa.Float, nullable=True),
        sa.Column("drift", sa.Boolean, nullable=True),
        sa.Column("flagged", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("human_label", sa.Integer, nullable=True),
        sa.Column("labelled_at", sa.Float, nullable=True),
    )
    op.create_index("ix_samples_device_id_id", "samples", ["device_id", "id"])
    op.create_index("ix_samples_queue", "samples", ["human_label", "uncertainty"])


def downgrade() -> None:
    op.drop_index("ix_samples_queue", table_name="samples")
    op.drop_index("ix_samples_device_id_id", table_name="samples")
    op.drop_table("samples")
