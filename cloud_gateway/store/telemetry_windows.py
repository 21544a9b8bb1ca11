"""The ``telemetry`` table: the windows agents publish, exactly once each.

Windows are unique on (device, boot, seq): the agent may send a window twice
across a broker outage (QoS 1 is at-least-once), and the store turns that into
exactly once. ``boot`` is a random id the agent makes with its state dir, so a
device whose state dir was reset (its seq back at 0) is not mistaken for a
redelivery.

Windows arrive in batches from the gateway's ingest thread (`WindowStore.add_many`): one transaction, one
multi-row insert that skips the (device, boot, seq) keys already stored, and one upsert of each device's
last window. Raw windows older than the retention are deleted by `delete_before` (the ``t_end`` index), after
they were added to their device's hourly row (``telemetry_hourly``, `WindowStore.hourly`).
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
    PrimaryKeyConstraint,
    String,
    Table,
    UniqueConstraint,
    case,
    delete,
    select,
)

from .database import Database, meta
from .devices import DeviceStore, telemetry_columns

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
    Index("ix_telemetry_t_end", "t_end"),  # the retention sweep (Alembic 0009)
)

# what is left of the windows past the retention: one row per device and hour (Alembic 0010)
telemetry_hourly = Table(
    "telemetry_hourly", meta,
    Column("device_id", String(64), nullable=False),
    Column("hour", Integer, nullable=False),  # the hour's start, in hours since the epoch (of the windows' t_end)
    Column("windows", Integer, nullable=False),
    Column("inputs", Integer, nullable=False),
    Column("offloaded", Float, nullable=False),  # inputs sent to the cloud (sum of offload_rate x inputs)
    Column("fallbacks", Float, nullable=False),  # inputs answered by fallback (sum of fallback_rate x inputs)
    Column("edge_p95_max", Float), Column("cloud_p95_max", Float),  # the hour's worst window
    Column("drift_windows", Integer, nullable=False),  # windows that flagged drift
    PrimaryKeyConstraint("device_id", "hour", name="pk_telemetry_hourly"),
)
HOURLY_SUMS = ("windows", "inputs", "offloaded", "fallbacks", "drift_windows")
HOURLY_MAX = ("edge_p95_max", "cloud_p95_max")


class WindowStore:
    def __init__(self, db: Database, devices: DeviceStore) -> None:
        self.engine = db.engine
        self.devices = devices  # a stored window is also the device's last one

    def add(self, device_id: str, msg: dict[str, Any]) -> bool:
        """Store a window; False if this (device, boot, seq) was already stored (a redelivery)."""
        return self.add_many([(device_id, msg)])[0]

    def add_many(self, items: list[tuple[str, dict[str, Any]]]) -> list[bool]:
        """Store windows in one transaction; per window, whether it is new (False: this (device, boot, seq) was
        stored before, or earlier in ``items``: a redelivery). Each device's newest window given becomes its
        last one. Raises when the database does: then nothing of the batch is stored."""
        if not items:
            return []
        now = time.time()
        keys = [(d, str(m.get("boot") or "")[:32], int(m["seq"])) for d, m in items]
        rows, first = [], {}
        for i, (k, (_, m)) in enumerate(zip(keys, items)):
            if k not in first:
                first[k] = i
                rows.append({"device_id": k[0], "boot": k[1], "seq": k[2], "t_end": m.get("t_end"),
                             "received": now, "payload": m})
        with self.engine.begin() as c:
            stored = {tuple(r) for r in c.execute(
                _insert_new(c).returning(telemetry.c.device_id, telemetry.c.boot, telemetry.c.seq), rows)}
            new = [k in stored and first[k] == i for i, k in enumerate(keys)]
            self.devices.set_last_telemetry_many([(d, m, now) for (d, m), n in zip(items, new) if n], conn=c)
        return new

    def delete_before(self, t_end: float, *, limit: int = 5000) -> int:
        """Delete up to ``limit`` windows that ended before ``t_end`` (agent clock), each first added to its
        device's hourly row; how many went. A sweep calls it until it returns less than ``limit``: short
        transactions, so ingest is never held for long."""
        with self.engine.begin() as c:
            rows = c.execute(select(telemetry.c.id, telemetry.c.device_id, telemetry.c.t_end, telemetry.c.payload)
                             .where(telemetry.c.t_end < t_end).order_by(telemetry.c.id).limit(limit)).all()
            if not rows:
                return 0
            hours: dict[tuple[str, int], dict[str, Any]] = {}
            for r in rows:
                p = r.payload if isinstance(r.payload, dict) else json.loads(r.payload)
                _add_to_hour(hours.setdefault((r.device_id, int(r.t_end // 3600)),
                                              {**dict.fromkeys(HOURLY_SUMS, 0), **dict.fromkeys(HOURLY_MAX)}), p)
            ins: Any = _dialect_insert(c)(telemetry_hourly)
            col = telemetry_hourly.c
            c.execute(ins.on_conflict_do_update(
                index_elements=["device_id", "hour"],
                set_={**{k: col[k] + ins.excluded[k] for k in HOURLY_SUMS},
                      **{k: case((col[k].is_(None), ins.excluded[k]), (ins.excluded[k].is_(None), col[k]),
                                 (ins.excluded[k] > col[k], ins.excluded[k]), else_=col[k]) for k in HOURLY_MAX}}),
                [{"device_id": d, "hour": h, **v} for (d, h), v in hours.items()])
            c.execute(delete(telemetry).where(telemetry.c.id.in_([r.id for r in rows])))
            return len(rows)

    def hourly(self, device_id: str, *, limit: int = 24 * 30) -> list[dict[str, Any]]:
        """The device's last ``limit`` hourly rows (windows past the retention), oldest first, with their rates."""
        with self.engine.connect() as c:
            rows = c.execute(select(telemetry_hourly).where(telemetry_hourly.c.device_id == device_id)
                             .order_by(telemetry_hourly.c.hour.desc()).limit(limit)).mappings().all()
        out = []
        for r in reversed(rows):
            n = r["inputs"]
            out.append({"hour_start": r["hour"] * 3600.0, "windows": r["windows"], "inputs": n,
                        "offload_rate": r["offloaded"] / n if n else None,
                        "fallback_rate": r["fallbacks"] / n if n else None,
                        "edge_p95_max": r["edge_p95_max"], "cloud_p95_max": r["cloud_p95_max"],
                        "drift_windows": r["drift_windows"]})
        return out

    def count(self) -> int:
        from sqlalchemy import func

        with self.engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(telemetry)).scalar() or 0)

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


def _dialect_insert(c: Any) -> Any:
    from sqlalchemy.dialects import postgresql, sqlite

    if c.dialect.name not in ("sqlite", "postgresql"):
        raise NotImplementedError(f"telemetry store on {c.dialect.name}: SQLite and PostgreSQL are supported")
    return sqlite.insert if c.dialect.name == "sqlite" else postgresql.insert


def _insert_new(c: Any) -> Any:
    """An INSERT that skips rows whose (device, boot, seq) is stored already (another replica's, a redelivery)."""
    ins: Any = _dialect_insert(c)(telemetry)
    return ins.on_conflict_do_nothing(index_elements=["device_id", "boot", "seq"])


def _add_to_hour(h: dict[str, Any], w: dict[str, Any]) -> None:
    """Add one window to its hour's sums (anything missing or mistyped counts as nothing)."""
    cols = telemetry_columns(w)
    n = cols["inputs"] or 0
    h["windows"] += 1
    h["inputs"] += n
    h["offloaded"] += n * (cols["offload_rate"] or 0.0)
    h["fallbacks"] += n * (cols["fallback_rate"] or 0.0)
    h["drift_windows"] += int(bool(cols["drifting"]))
    for k, v in (("edge_p95_max", cols["edge_p95"]), ("cloud_p95_max", cols["cloud_p95"])):
        if v is not None and (h[k] is None or v > h[k]):
            h[k] = v
