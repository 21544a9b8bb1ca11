"""Fleet scale: the columns a paged, sorted, filtered device list and the fleet summary read; ``t_end`` indexed.

``devices`` gains what the API sorts, filters and aggregates on, copied out of the JSON it already holds (the
last status and the last telemetry window), so ``GET /api/devices?sort=...`` and ``GET /api/fleet/summary`` are
SQL over plain columns, not JSON decoded per device in Python. ``telemetry.t_end`` is indexed for the retention
sweep (windows older than the retention are deleted by it). Rows stored before are filled from their JSON.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

COLUMNS = (
    sa.Column("state", sa.String(16), nullable=True),  # the last status's state: online | offline | ...
    sa.Column("version", sa.String(128), nullable=True),  # the bundle version the last status named
    sa.Column("bundle_sha256", sa.String(64), nullable=True),  # the bundle the last status named
    sa.Column("drifting", sa.Boolean, nullable=True),  # the last window's drift flag
    sa.Column("inputs", sa.Integer, nullable=True),  # the last window's inputs (weights the fleet's rates)
    sa.Column("offload_rate", sa.Float, nullable=True),
    sa.Column("fallback_rate", sa.Float, nullable=True),
    sa.Column("edge_p95", sa.Float, nullable=True),  # seconds, the last window's edge latency p95
    sa.Column("cloud_p95", sa.Float, nullable=True),  # seconds, the last window's cloud round trip p95
)


def upgrade() -> None:
    from cloud_gateway.store.devices import status_columns, telemetry_columns

    with op.batch_alter_table("devices") as batch:  # SQLite: copy-and-move; PostgreSQL: ALTER TABLE
        for col in COLUMNS:
            batch.add_column(col.copy())
    op.create_index("ix_telemetry_t_end", "telemetry", ["t_end"])
    bind = op.get_bind()
    devices = sa.table("devices", sa.column("device_id", sa.String), sa.column("status", sa.JSON),
                       sa.column("last_telemetry", sa.JSON), *(sa.column(c.name, c.type) for c in COLUMNS))
    for device_id, status, tel in bind.execute(
            sa.select(devices.c.device_id, devices.c.status, devices.c.last_telemetry)).all():
        values = {**(status_columns(status) if isinstance(status, dict) else {}),
                  **(telemetry_columns(tel) if isinstance(tel, dict) else {})}
        values.pop("model_line", None)
        if values:
            bind.execute(sa.update(devices).where(devices.c.device_id == device_id).values(**values))


def downgrade() -> None:
    op.drop_index("ix_telemetry_t_end", "telemetry")
    with op.batch_alter_table("devices") as batch:
        for col in COLUMNS:
            batch.drop_column(col.name)
