"""Samples: a ``human_answer`` column (JSON), a person's answer where it is not one class.

A detection frame's teacher answer is its detections (JSON, in ``teacher_probs``, `Task.teacher_record`); the
person labelling it accepts or rejects each box, and the boxes they kept are stored here. ``labelled_at`` is set
for either kind of label, so the per-device count of labelled samples reads it.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("samples") as batch:  # SQLite: copy-and-move; PostgreSQL: ALTER TABLE
        batch.add_column(sa.Column("human_answer", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("samples") as batch:
        batch.drop_column("human_answer")
