"""Telemetry: index (device_id, id) for a device's latest windows, replacing the device_id-only index.

`WindowStore.history` (`cloud_gateway.store.telemetry_windows`) asks for one device's newest N windows
(``WHERE device_id = ? ORDER BY id DESC LIMIT N``); with (device_id, id) that is
an index range scan instead of a sort of all the device's rows. The composite
index also serves every lookup the old one did.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_telemetry_device_id_id", "telemetry", ["device_id", "id"])
    op.drop_index("ix_telemetry_device_id", table_name="telemetry")


def downgrade() -> None:
    op.create_index("ix_telemetry_device_id", "telemetry", ["device_id"])
    op.drop_index("ix_telemetry_device_id_id", table_name="telemetry")
