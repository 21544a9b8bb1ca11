"""Devices: a ``model_line`` column, the model name (the manifest's ``model.name``) each device last reported.

Rollouts, the refresh policy and its proposals are scoped to a model line; the column keeps a device's line
when its retained status is only ``offline`` (the last will carries no model). Rows stored before are filled
from the status they hold, where it names a model.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:  # SQLite: copy-and-move; PostgreSQL: ALTER TABLE
        batch.add_column(sa.Column("model_line", sa.String(128), nullable=True))
    bind = op.get_bind()
    devices = sa.table("devices", sa.column("device_id", sa.String), sa.column("status", sa.JSON),
                       sa.column("model_line", sa.String))
    for device_id, status in bind.execute(sa.select(devices.c.device_id, devices.c.status)).all():
        line = status.get("model") if isinstance(status, dict) else None
        if isinstance(line, str) and line:
            bind.execute(sa.update(devices).where(devices.c.device_id == device_id).values(model_line=line[:128]))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("model_line")
