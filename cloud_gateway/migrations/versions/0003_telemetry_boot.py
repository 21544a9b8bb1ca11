"""Telemetry: a ``boot`` column in the dedupe key, (device, seq) -> (device, boot, seq).

``boot`` is the random id an agent makes with its state dir: after a reset
its seq starts at 0 again, and those windows are new, not redeliveries. Rows
stored before have ``boot = ''``. A store made by the gateway version that
added the column with ``create_all`` (no migrations yet) already has it and is
left as is.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _state() -> tuple[set[str], set[str]]:
    insp = sa.inspect(op.get_bind())
    cols = {c["name"] for c in insp.get_columns("telemetry")}
    uniques = {u["name"] for u in insp.get_unique_constraints("telemetry") if u.get("name")}
    return cols, uniques


def upgrade() -> None:
    cols, uniques = _state()
    with op.batch_alter_table("telemetry") as batch:  # SQLite: copy-and-move; PostgreSQL: ALTER TABLE
        if "boot" not in cols:
            batch.add_column(sa.Column("boot", sa.String(32), nullable=False, server_default=""))
        if "uq_device_seq" in uniques:
            batch.drop_constraint("uq_device_seq", type_="unique")
        if "uq_device_boot_seq" not in uniques:
            batch.create_unique_constraint("uq_device_boot_seq", ["device_id", "boot", "seq"])


def downgrade() -> None:
    with op.batch_alter_table("telemetry") as batch:
        batch.drop_constraint("uq_device_boot_seq", type_="unique")
        batch.create_unique_constraint("uq_device_seq", ["device_id", "seq"])
        batch.drop_column("boot")
