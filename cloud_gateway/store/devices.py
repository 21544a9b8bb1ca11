"""The ``devices`` table: one row per device, its last status, its model line and its last telemetry window."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import JSON, Column, Float, String, Table, insert, select, update
from sqlalchemy.exc import IntegrityError

from .database import Database, meta

devices = Table(
    "devices", meta,
    Column("device_id", String(64), primary_key=True),
    Column("status", JSON), Column("status_time", Float),
    Column("model_line", String(128)),  # the manifest's model.name the device last reported (Alembic 0007)
    Column("last_telemetry", JSON), Column("last_seen", Float),
)


class DeviceStore:
    def __init__(self, db: Database) -> None:
        self.engine = db.engine

    def set_status(self, device_id: str, status: dict[str, Any]) -> None:
        """Store a retained status; its ``model`` (the bundle's model line) is kept apart, so an ``offline``
        status (the last will, which names no model) does not forget which line the device runs."""
        line = status.get("model")
        extra = {"model_line": line[:128]} if isinstance(line, str) and line else {}
        self._upsert(device_id, status=status, status_time=time.time(), **extra)

    def set_last_telemetry(self, device_id: str, msg: dict[str, Any], received: float) -> None:
        self._upsert(device_id, last_telemetry=msg, last_seen=received)

    def _upsert(self, device_id: str, **values: Any) -> None:
        with self.engine.begin() as c:
            n = c.execute(update(devices).where(devices.c.device_id == device_id).values(**values)).rowcount
            if n == 0:
                try:
                    with c.begin_nested():
                        c.execute(insert(devices).values(device_id=device_id, **values))
                except IntegrityError:  # another replica inserted it meanwhile
                    c.execute(update(devices).where(devices.c.device_id == device_id).values(**values))

    def all(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            rows = c.execute(select(devices).order_by(devices.c.device_id)).mappings().all()
        return [dict(r) for r in rows]

    def statuses(self, device_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The last status of each of ``device_ids`` that has one, in one query per 500 ids (what a rollout's
        check reads each tick: never one query per device)."""
        out: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as c:
            for i in range(0, len(device_ids), 500):
                q = select(devices.c.device_id, devices.c.status).where(devices.c.device_id.in_(device_ids[i:i + 500]))
                out.update({r.device_id: r.status for r in c.execute(q) if isinstance(r.status, dict)})
        return out

    def get(self, device_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            r = c.execute(select(devices).where(devices.c.device_id == device_id)).mappings().first()
        return dict(r) if r else None
