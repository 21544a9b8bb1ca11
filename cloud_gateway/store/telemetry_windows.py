"""The ``telemetry`` table: the windows agents publish, exactly once each.

Windows are unique on (device, boot, seq): the agent may send a window twice
across a broker outage (QoS 1 is at-least-once), and the store turns that into
exactly once. ``boot`` is a random id the agent makes with its state dir, so a
device whose state dir was reset (its seq back at 0) is not mistaken for a
redelivery.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Float,
    Index,
    Integer,
    String,
    Table,
    UniqueConstraint,
    insert,
    select,
)
from sqlalchemy.exc import IntegrityError

from .database import Database, meta
from .devices import DeviceStore

telemetry = Table(
    "telemetry", meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("device_id", String(64), nullable=False),
    Column("boot", String(32), nullable=False, server_default=""),
    Column("seq", Integer, nullable=False),
    Column("t_end", Float), Column("received", Float, nullable=False),
    Column("payload", JSON, nullable=False),
    UniqueConstraint("device_id", "boot", "seq", name="uq_device_boot_seq"),
    Index("ix_telemetry_device_id_id", "device_id", "id"),
)


class WindowStore:
    def __init__(self, db: Database, devices: DeviceStore) -> None:
        self.engine = db.engine
        self.devices = devices  # a stored window is also the device's last one

    def add(self, device_id: str, msg: dict[str, Any]) -> bool:
        """Store a window; False if this (device, boot, seq) was already stored (a redelivery)."""
        now = time.time()
        try:
            with self.engine.begin() as c:
                c.execute(insert(telemetry).values(device_id=device_id, boot=str(msg.get("boot") or ""),
                                                   seq=int(msg["seq"]),
                                                   t_end=msg.get("t_end"), received=now, payload=msg))
        except IntegrityError:
            return False
        self.devices.set_last_telemetry(device_id, msg, now)
        return True

    def history(self, device_id: str, *, limit: int = 500) -> list[dict[str, Any]]:
        """The device's last ``limit`` windows in arrival order."""
        with self.engine.connect() as c:
            rows = c.execute(
                select(telemetry.c.seq, telemetry.c.received, telemetry.c.payload)
                .where(telemetry.c.device_id == device_id).order_by(telemetry.c.id.desc()).limit(limit)
            ).all()
        return [{"seq": r.seq, "received": r.received, **(r.payload if isinstance(r.payload, dict)
                                                           else json.loads(r.payload))} for r in reversed(rows)]

    def since(self, device_id: str, since: float) -> list[dict[str, Any]]:
        """The device's telemetry windows that ended at or after ``since`` (agent clock)."""
        with self.engine.connect() as c:
            rows = c.execute(select(telemetry.c.payload).where(telemetry.c.device_id == device_id,
                                                               telemetry.c.t_end >= since)
                             .order_by(telemetry.c.id)).all()
        return [r[0] if isinstance(r[0], dict) else json.loads(r[0]) for r in rows]

    def arrival_order(self, device_id: str) -> list[int]:
        """Sequence numbers in the order they were stored (tests check order and uniqueness)."""
        with self.engine.connect() as c:
            return [int(r[0]) for r in c.execute(
                select(telemetry.c.seq).where(telemetry.c.device_id == device_id).order_by(telemetry.c.id))]
