"""The ``devices`` table: one row per device, its last status, its model line and its last telemetry window.

Beside the JSON, the row keeps plain columns copied out of it (state, bundle, drift flag, rates, latency p95s;
Alembic 0009): the paged device list sorts and filters on them and the fleet summary aggregates them in SQL, so
neither decodes a JSON document per device. Writes come in batches from the ingest thread (`set_statuses`,
`set_last_telemetry_many`): one statement executed for many rows, in the caller's transaction or one of its own.
"""

from __future__ import annotations

import base64
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    Float,
    Integer,
    String,
    Table,
    and_,
    case,
    func,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.exc import IntegrityError

from .database import Database, meta

devices = Table(
    "devices", meta,
    Column("device_id", String(64), primary_key=True),
    Column("status", JSON), Column("status_time", Float),
    Column("model_line", String(128)),  # the manifest's model.name the device last reported (Alembic 0007)
    Column("last_telemetry", JSON), Column("last_seen", Float),
    # copied from the status and the last window, for sorting, filtering and aggregating in SQL (Alembic 0009)
    Column("state", String(16)), Column("version", String(128)), Column("bundle_sha256", String(64)),
    Column("drifting", Boolean), Column("inputs", Integer),
    Column("offload_rate", Float), Column("fallback_rate", Float),
    Column("edge_p95", Float), Column("cloud_p95", Float),
)

STATUS_COLUMNS = ("status", "status_time", "model_line", "state", "version", "bundle_sha256")
TELEMETRY_COLUMNS = ("last_telemetry", "last_seen", "drifting", "inputs", "offload_rate", "fallback_rate",
                     "edge_p95", "cloud_p95")
# an offline status (the last will) names no model or bundle: the device's last known ones stay
_KEEP_WHEN_NULL = ("model_line", "version", "bundle_sha256")

# what the device list sorts by (``?sort=NAME`` ascending, ``?sort=-NAME`` descending)
SORTS = ("device_id", "last_seen", "state", "model_line", "version", "offload_rate", "fallback_rate", "edge_p95",
         "cloud_p95", "inputs")
STATES = ("online", "offline", "unknown")  # ``unknown``: no status stored yet


def _text(v: Any, n: int) -> str | None:
    return v[:n] if isinstance(v, str) and v else None


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def status_columns(status: dict[str, Any]) -> dict[str, Any]:
    """The plain columns a status sets (None: the status does not say)."""
    return {"model_line": _text(status.get("model"), 128), "state": _text(status.get("state"), 16) or "unknown",
            "version": _text(status.get("version"), 128), "bundle_sha256": _text(status.get("bundle_sha256"), 64)}


def telemetry_columns(msg: dict[str, Any]) -> dict[str, Any]:
    """The plain columns a telemetry window sets."""
    def part(v: Any) -> dict[str, Any]:
        return v if isinstance(v, dict) else {}

    lat = part(msg.get("latency"))
    p95 = {k: _num(part(lat.get(k)).get("p95")) for k in ("edge", "cloud_rtt")}
    inputs = part(msg.get("counts")).get("inputs")
    drift = part(msg.get("drift"))
    return {"drifting": bool(drift.get("flag")),
            "inputs": int(inputs) if isinstance(inputs, int) and not isinstance(inputs, bool) else None,
            "offload_rate": _num(msg.get("offload_rate")), "fallback_rate": _num(msg.get("fallback_rate")),
            "edge_p95": p95["edge"], "cloud_p95": p95["cloud_rtt"]}


@dataclass(frozen=True)
class DeviceQuery:
    """A page of the device list: filters, a sort and a keyset cursor (the last row of the previous page)."""

    limit: int = 50
    sort: str = "device_id"  # one of SORTS, ``-`` in front for descending
    cursor: str | None = None
    state: str | None = None  # online | offline | unknown
    drifting: bool | None = None
    line: str | None = None
    bundle: str | None = None  # a version, or a bundle sha256 (or its first 8+ hex digits)
    q: str | None = None  # a part of the device id


def _cursor(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def read_cursor(text: str) -> list[Any]:
    """The cursor's values; ValueError when it is not one this store wrote."""
    try:
        v = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, TypeError) as e:
        raise ValueError("cursor: not a cursor this gateway gave") from e
    if not (isinstance(v, list) and len(v) == 2 and isinstance(v[1], str)):
        raise ValueError("cursor: not a cursor this gateway gave")
    return v


class DeviceStore:
    def __init__(self, db: Database) -> None:
        self.engine = db.engine

    # --- writes ----------------------------------------------------------------
    def set_status(self, device_id: str, status: dict[str, Any]) -> None:
        """Store a retained status; its ``model`` (the bundle's model line) is kept apart, so an ``offline``
        status (the last will, which names no model) does not forget which line the device runs."""
        self.set_statuses([(device_id, status)])

    def set_statuses(self, items: Iterable[tuple[str, dict[str, Any]]], *, conn: Connection | None = None,
                     now: float | None = None) -> None:
        """Store many statuses in one statement (the last one given per device wins)."""
        now = time.time() if now is None else now
        rows = {d: {"device_id": d, "status": s, "status_time": now, **status_columns(s)} for d, s in items}
        self._upsert_many(list(rows.values()), STATUS_COLUMNS, conn)

    def set_last_telemetry(self, device_id: str, msg: dict[str, Any], received: float) -> None:
        self.set_last_telemetry_many([(device_id, msg, received)])

    def set_last_telemetry_many(self, items: Iterable[tuple[str, dict[str, Any], float]], *,
                                conn: Connection | None = None) -> None:
        rows = {d: {"device_id": d, "last_telemetry": m, "last_seen": t, **telemetry_columns(m)} for d, m, t in items}
        self._upsert_many(list(rows.values()), TELEMETRY_COLUMNS, conn)

    def _upsert_many(self, rows: list[dict[str, Any]], cols: tuple[str, ...], conn: Connection | None) -> None:
        if not rows:
            return
        if conn is None:
            with self.engine.begin() as c:
                return self._upsert_many(rows, cols, c)
        name = conn.dialect.name
        if name in ("sqlite", "postgresql"):
            from sqlalchemy.dialects import postgresql, sqlite

            ins: Any = (sqlite.insert if name == "sqlite" else postgresql.insert)(devices)
            set_ = {c: (func.coalesce(ins.excluded[c], devices.c[c]) if c in _KEEP_WHEN_NULL else ins.excluded[c])
                    for c in cols}
            conn.execute(ins.on_conflict_do_update(index_elements=[devices.c.device_id], set_=set_), rows)
            return
        for row in rows:  # another database: one row at a time, in the one transaction
            values = {c: row[c] for c in cols if row[c] is not None or c not in _KEEP_WHEN_NULL}
            n = conn.execute(update(devices).where(devices.c.device_id == row["device_id"]).values(**values)).rowcount
            if n == 0:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(devices).values(device_id=row["device_id"], **values))
                except IntegrityError:  # another replica inserted it meanwhile
                    conn.execute(update(devices).where(devices.c.device_id == row["device_id"]).values(**values))

    # --- reads -----------------------------------------------------------------
    def all(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            rows = c.execute(select(devices).order_by(devices.c.device_id)).mappings().all()
        return [dict(r) for r in rows]

    def get(self, device_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            r = c.execute(select(devices).where(devices.c.device_id == device_id)).mappings().first()
        return dict(r) if r else None

    def versions(self, device_ids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Per device: state, model line, bundle sha256 and version, and the last command's outcome, in one query
        (what a rollout checks every tick), for ``device_ids`` or every device."""
        q = select(devices.c.device_id, devices.c.state, devices.c.model_line, devices.c.bundle_sha256,
                   devices.c.version, devices.c.status)
        ids = None if device_ids is None else list(device_ids)
        # ids in chunks of 500: one query per chunk, and within every database's limit on bound parameters
        chunks = [q] if ids is None else [q.where(devices.c.device_id.in_(ids[i:i + 500]))
                                          for i in range(0, len(ids), 500)]
        with self.engine.connect() as c:
            return {r.device_id: {"state": r.state, "model_line": r.model_line, "bundle_sha256": r.bundle_sha256,
                                  "version": r.version, "status": r.status} for cq in chunks for r in c.execute(cq)}

    def _filters(self, q: DeviceQuery) -> list[Any]:
        where: list[Any] = []
        if q.state == "unknown":
            where.append(or_(devices.c.state.is_(None), devices.c.state == "unknown"))
        elif q.state == "offline":  # anything not online that is known: offline, or a state an agent named
            where.append(and_(devices.c.state.is_not(None), devices.c.state.not_in(("online", "unknown"))))
        elif q.state:
            where.append(devices.c.state == q.state)
        if q.drifting is not None:
            where.append(devices.c.drifting == true() if q.drifting
                         else or_(devices.c.drifting.is_(None), devices.c.drifting == False))  # noqa: E712
        if q.line:
            where.append(devices.c.model_line == q.line)
        if q.bundle:
            where.append(or_(devices.c.version == q.bundle, devices.c.bundle_sha256 == q.bundle,
                             and_(func.length(q.bundle) >= 8, devices.c.bundle_sha256.startswith(q.bundle,
                                                                                                  autoescape=True))))
        if q.q:
            where.append(devices.c.device_id.contains(q.q, autoescape=True))
        return where

    def page(self, q: DeviceQuery) -> tuple[list[dict[str, Any]], str | None, int]:
        """One page of the device list: (rows, the cursor of the next page or None, how many match in all).

        Keyset paging on (sort key, device id): a page costs the same at row 4,950 as at row 0, and a device
        that changes while a person pages moves, it is never repeated or skipped because another one came in.
        A missing number sorts as -1 (first ascending, last descending)."""
        desc = q.sort.startswith("-")
        name = q.sort.lstrip("-")
        if name not in SORTS:
            raise ValueError(f"sort: one of {', '.join(SORTS)} (prefix - for descending), got {q.sort!r}")
        col = devices.c[name]
        key = col if name == "device_id" else (
            func.coalesce(col, "") if isinstance(col.type, String) else func.coalesce(col, -1))
        where = self._filters(q)
        if q.cursor:
            last, last_id = read_cursor(q.cursor)
            if name == "device_id":
                where.append(devices.c.device_id < last_id if desc else devices.c.device_id > last_id)
            else:
                where.append(or_(key < last if desc else key > last,
                                 and_(key == last, devices.c.device_id > last_id)))
        order = [key.desc() if desc else key.asc()]
        if name != "device_id":
            order.append(devices.c.device_id.asc())
        with self.engine.connect() as c:
            rows = [dict(r) for r in c.execute(
                select(devices, key.label("_key")).where(*where).order_by(*order).limit(q.limit + 1)).mappings()]
            total = int(c.execute(select(func.count()).select_from(devices).where(*self._filters(q))).scalar() or 0)
        nxt = None
        if len(rows) > q.limit:
            rows = rows[:q.limit]
            nxt = _cursor([rows[-1]["_key"], rows[-1]["device_id"]])
        for r in rows:
            r.pop("_key", None)
        return rows, nxt, total

    def summary(self) -> dict[str, Any]:
        """The fleet at a glance, by aggregate SQL: device counts by state and drift, the fleet's offload and
        fallback rates (each device's last window, weighted by its inputs), and percentiles across devices of
        their last window's latency p95, for the whole fleet and per (model line, bundle version)."""
        d = devices.c
        online = d.state == "online"
        known_off = and_(d.state.is_not(None), d.state.not_in(("online", "unknown")))
        w = func.coalesce(d.inputs, 0)
        agg = (func.count().label("devices"),
               func.sum(case((online, 1), else_=0)).label("online"),
               func.sum(case((known_off, 1), else_=0)).label("offline"),
               func.sum(case((d.drifting == true(), 1), else_=0)).label("drifting"),
               func.sum(case((d.offload_rate.is_not(None), w), else_=0)).label("w_off"),
               func.sum(w * func.coalesce(d.offload_rate, 0.0)).label("off"),
               func.sum(case((d.fallback_rate.is_not(None), w), else_=0)).label("w_fb"),
               func.sum(w * func.coalesce(d.fallback_rate, 0.0)).label("fb"))
        with self.engine.connect() as c:
            groups = c.execute(select(d.model_line, d.version, *agg).group_by(d.model_line, d.version)
                               .order_by(d.model_line, d.version)).mappings().all()
            pct = {m: self._percentiles(c, getattr(d, m)) for m in ("edge_p95", "cloud_p95")}

        def block(rows: list[Any]) -> dict[str, Any]:
            n = {k: int(sum(r[k] or 0 for r in rows)) for k in ("devices", "online", "offline", "drifting")}
            w_off, w_fb = sum(r["w_off"] or 0 for r in rows), sum(r["w_fb"] or 0 for r in rows)
            return {**n, "unknown": n["devices"] - n["online"] - n["offline"],
                    "inputs": int(w_off),
                    "offload_rate": (sum(r["off"] or 0.0 for r in rows) / w_off) if w_off else None,
                    "fallback_rate": (sum(r["fb"] or 0.0 for r in rows) / w_fb) if w_fb else None}

        out = {**block(list(groups)), "latency": {m: pct[m].get(None, {}) for m in pct}, "groups": []}
        for r in groups:
            key = (r["model_line"], r["version"])
            out["groups"].append({"model_line": key[0], "version": key[1], **block([r]),
                                  "latency": {m: pct[m].get(key, {}) for m in pct}})
        return out

    @staticmethod
    def _percentiles(c: Connection, col: Any) -> dict[Any, dict[str, float]]:
        """p50/p95/p99 across devices of ``col`` (nearest rank), for the fleet (key None) and per (line, version):
        one window-function query, which returns only the rows at those ranks."""
        d = devices.c
        out: dict[Any, dict[str, float]] = {}
        for part in (None, (d.model_line, d.version)):
            rn = func.row_number().over(order_by=col, partition_by=part).label("rn")
            n = func.count().over(partition_by=part).label("n")
            cols = [col.label("v"), rn, n] + ([d.model_line, d.version] if part else [])
            sub = select(*cols).where(col.is_not(None)).subquery()
            ranks = {q: (sub.c.n * q + 99) // 100 for q in (50, 95, 99)}  # ceil(n * q / 100) in integers
            rows = c.execute(select(sub).where(or_(*(sub.c.rn == r for r in ranks.values())))).mappings().all()
            for r in rows:
                key = (r["model_line"], r["version"]) if part else None
                for q in (50, 95, 99):
                    if r["rn"] == (r["n"] * q + 99) // 100:
                        out.setdefault(key, {})[f"p{q}"] = r["v"]
        return out
