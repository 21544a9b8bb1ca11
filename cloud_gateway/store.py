"""Telemetry store: SQLite file by default, PostgreSQL (or any SQLAlchemy URL) in production.

Telemetry windows are unique on (device, boot, seq): the agent may send a
window twice across a broker outage (QoS 1 is at-least-once), and the store
turns that into exactly once. ``boot`` is a random id the agent makes with its
state dir, so a device whose state dir was reset (its seq back at 0) is not
mistaken for a redelivery. Several gateway replicas can share one database.

The schema is versioned with Alembic (``cloud_gateway/migrations``): opening a
store upgrades it in place to the newest revision, under a PostgreSQL advisory
lock so replicas starting together migrate once. A store made before migrations
existed (tables, no ``alembic_version``) is stamped as the baseline first.
The tables below describe the newest revision; they are never ``create_all``-ed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    create_engine,
    delete,
    false,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from edgecore.errors import GatewayError

meta = MetaData()
devices = Table(
    "devices", meta,
    Column("device_id", String(64), primary_key=True),
    Column("status", JSON), Column("status_time", Float),
    Column("last_telemetry", JSON), Column("last_seen", Float),
)
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

samples = Table(
    "samples", meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("device_id", String(64), nullable=False),
    Column("bundle", String(128), nullable=False, server_default=""),
    Column("received", Float, nullable=False),
    Column("input", LargeBinary, nullable=False),
    Column("teacher_probs", LargeBinary, nullable=False),
    Column("teacher_label", Integer, nullable=False),
    Column("uncertainty", Float, nullable=False),
    Column("confidence", Float), Column("drift", Boolean),
    Column("flagged", Boolean, nullable=False, server_default=false()),
    Column("human_label", Integer), Column("labelled_at", Float),
    Index("ix_samples_device_id_id", "device_id", "id"),
    Index("ix_samples_queue", "human_label", "uncertainty"),
)

rollouts = Table(
    "rollouts", meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("bundle", String(128), nullable=False), Column("state", String(32), nullable=False),
    Column("created", Float, nullable=False), Column("updated", Float, nullable=False),
    Column("plan", JSON, nullable=False), Column("baseline", JSON), Column("result", JSON),
)
rollout_steps = Table(
    "rollout_steps", meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("rollout_id", Integer, ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=False),
    Column("time", Float, nullable=False),
    Column("step", String(64), nullable=False), Column("detail", JSON),
    Index("ix_rollout_steps_rollout_id", "rollout_id", "id"),
)

BASELINE = "0001"  # the schema `create_all` made before migrations
policy_table = Table(
    "policy", meta,
    Column("id", Integer, primary_key=True), Column("doc", JSON, nullable=False), Column("updated", Float, nullable=False),
)
proposals = Table(
    "proposals", meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created", Float, nullable=False), Column("updated", Float, nullable=False),
    Column("state", String(32), nullable=False), Column("reason", JSON, nullable=False), Column("result", JSON),
)

ACTIVE_ROLLOUT_STATES = ("updating", "watching", "promoting", "rolling_back")
_MIGRATION_LOCK = 0x6564_6765  # pg_advisory_xact_lock key: "edge"


def db_url(spec: str | Path) -> str:
    """A path becomes ``sqlite:///path``; ``postgresql://`` (or ``postgres://``) uses the psycopg 3 driver;
    any other URL with ``://`` is used as is."""
    s = str(spec)
    for plain in ("postgresql://", "postgres://"):
        if s.startswith(plain):
            return "postgresql+psycopg://" + s[len(plain):]
    if "://" in s:
        return s
    path = Path(s).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


class TelemetryStore:
    def __init__(self, url: str | Path) -> None:
        self.url = db_url(url)
        try:
            kwargs: dict[str, Any] = {}
            if self.url.startswith("sqlite"):
                kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            self.engine = create_engine(self.url, pool_pre_ping=True, **kwargs)
            migrate(self.engine)
        except (SQLAlchemyError, ImportError) as e:  # ImportError: the URL's driver is not installed
            raise GatewayError(f"cannot open telemetry store {_safe(self.url)}: {e}") from e

    def add_telemetry(self, device_id: str, msg: dict[str, Any]) -> bool:
        """Store a window; False if this (device, boot, seq) was already stored (a redelivery)."""
        now = time.time()
        try:
            with self.engine.begin() as c:
                c.execute(insert(telemetry).values(device_id=device_id, boot=str(msg.get("boot") or ""),
                                                   seq=int(msg["seq"]),
                                                   t_end=msg.get("t_end"), received=now, payload=msg))
        except IntegrityError:
            return False
        self._upsert(device_id, last_telemetry=msg, last_seen=now)
        return True

    def set_status(self, device_id: str, status: dict[str, Any]) -> None:
        self._upsert(device_id, status=status, status_time=time.time())

    def _upsert(self, device_id: str, **values: Any) -> None:
        with self.engine.begin() as c:
            n = c.execute(update(devices).where(devices.c.device_id == device_id).values(**values)).rowcount
            if n == 0:
                try:
                    with c.begin_nested():
                        c.execute(insert(devices).values(device_id=device_id, **values))
                except IntegrityError:  # another replica inserted it meanwhile
                    c.execute(update(devices).where(devices.c.device_id == device_id).values(**values))

    def devices(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            rows = c.execute(select(devices).order_by(devices.c.device_id)).mappings().all()
        return [dict(r) for r in rows]

    def device(self, device_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            r = c.execute(select(devices).where(devices.c.device_id == device_id)).mappings().first()
        return dict(r) if r else None

    def history(self, device_id: str, *, limit: int = 500) -> list[dict[str, Any]]:
        """The device's last ``limit`` windows in arrival order."""
        with self.engine.connect() as c:
            rows = c.execute(
                select(telemetry.c.seq, telemetry.c.received, telemetry.c.payload)
                .where(telemetry.c.device_id == device_id).order_by(telemetry.c.id.desc()).limit(limit)
            ).all()
        return [{"seq": r.seq, "received": r.received, **(r.payload if isinstance(r.payload, dict)
                                                           else json.loads(r.payload))} for r in reversed(rows)]

    # --- collected samples (cloud_gateway/samples.py decides what; this stores it) ----------------
    def add_samples(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            with self.engine.begin() as c:
                c.execute(insert(samples), rows)

    def trim_samples(self, *, max_per_device: int, max_total: int, older_than: float | None) -> int:
        """Enforce the bounds, oldest out: retention, then per device, then in total. Returns rows deleted."""
        n = 0
        with self.engine.begin() as c:
            if older_than is not None:
                n += c.execute(delete(samples).where(samples.c.received < older_than)).rowcount
            counts = c.execute(select(samples.c.device_id, func.count()).group_by(samples.c.device_id)).all()
            for device_id, count in counts:
                if count > max_per_device:
                    n += self._drop_oldest(c, count - max_per_device, samples.c.device_id == device_id)
            total = c.execute(select(func.count()).select_from(samples)).scalar_one()
            if total > max_total:
                n += self._drop_oldest(c, total - max_total, None)
        return n

    @staticmethod
    def _drop_oldest(c: Connection, k: int, where: Any) -> int:
        q = select(samples.c.id).order_by(samples.c.id).limit(k)
        if where is not None:
            q = q.where(where)
        ids = [r[0] for r in c.execute(q)]
        return c.execute(delete(samples).where(samples.c.id.in_(ids))).rowcount if ids else 0

    def sample_rows(self, *, after: int = 0, limit: int = 100, device: str | None = None,
                    queue: float | None = None) -> list[dict[str, Any]]:
        """Rows in id order after ``after``; ``queue``: only unlabelled ones at least that uncertain, most first."""
        q = select(samples)
        if device is not None:
            q = q.where(samples.c.device_id == device)
        if queue is not None:
            q = q.where(samples.c.human_label.is_(None), samples.c.uncertainty >= queue)
            q = q.order_by(samples.c.uncertainty.desc(), samples.c.id)
        else:
            q = q.where(samples.c.id > after).order_by(samples.c.id)
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(q.limit(limit)).mappings()]

    def label_sample(self, sample_id: int, label: int) -> bool:
        with self.engine.begin() as c:
            return bool(c.execute(update(samples).where(samples.c.id == sample_id)
                                  .values(human_label=label, labelled_at=time.time())).rowcount)

    def delete_samples(self, device: str) -> int:
        with self.engine.begin() as c:
            return int(c.execute(delete(samples).where(samples.c.device_id == device)).rowcount)

    def sample_stats(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            rows = c.execute(select(samples.c.device_id, func.count(), func.count(samples.c.human_label),
                                    func.min(samples.c.received), func.max(samples.c.received))
                             .group_by(samples.c.device_id).order_by(samples.c.device_id)).all()
        return [{"device": d, "samples": int(n), "labelled": int(lab), "oldest": lo, "newest": hi}
                for d, n, lab, lo, hi in rows]

    # --- rollouts (cloud_gateway/rollout.py drives them; every step is recorded here) ---------------
    def create_rollout(self, bundle: str, plan: dict[str, Any], baseline: dict[str, Any] | None) -> int:
        now = time.time()
        with self.engine.begin() as c:
            rid = c.execute(insert(rollouts).values(bundle=bundle, state="updating", created=now, updated=now,
                                                    plan=plan, baseline=baseline)).inserted_primary_key[0]
        return int(rid)

    def set_rollout(self, rollout_id: int, **values: Any) -> None:
        with self.engine.begin() as c:
            c.execute(update(rollouts).where(rollouts.c.id == rollout_id).values(updated=time.time(), **values))

    def add_rollout_step(self, rollout_id: int, step: str, detail: dict[str, Any] | None = None) -> None:
        with self.engine.begin() as c:
            c.execute(insert(rollout_steps).values(rollout_id=rollout_id, time=time.time(), step=step, detail=detail))

    def rollouts(self, *, active: bool = False) -> list[dict[str, Any]]:
        q = select(rollouts).order_by(rollouts.c.id)
        if active:
            q = q.where(rollouts.c.state.in_(ACTIVE_ROLLOUT_STATES))
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def rollout(self, rollout_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            r = c.execute(select(rollouts).where(rollouts.c.id == rollout_id)).mappings().first()
            if r is None:
                return None
            steps = c.execute(select(rollout_steps).where(rollout_steps.c.rollout_id == rollout_id)
                              .order_by(rollout_steps.c.id)).mappings().all()
        return {**dict(r), "steps": [{k: v for k, v in dict(s).items() if k != "rollout_id"} for s in steps]}

    def windows_since(self, device_id: str, since: float) -> list[dict[str, Any]]:
        """The device's telemetry windows that ended at or after ``since`` (agent clock)."""
        with self.engine.connect() as c:
            rows = c.execute(select(telemetry.c.payload).where(telemetry.c.device_id == device_id,
                                                               telemetry.c.t_end >= since)
                             .order_by(telemetry.c.id)).all()
        return [r[0] if isinstance(r[0], dict) else json.loads(r[0]) for r in rows]

    # --- refresh policy (cloud_gateway/policy.py) ----------------------------------------------------
    def policy(self) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            r = c.execute(select(policy_table.c.doc).where(policy_table.c.id == 1)).first()
        return None if r is None else (r[0] if isinstance(r[0], dict) else json.loads(r[0]))

    def set_policy(self, doc: dict[str, Any]) -> None:
        with self.engine.begin() as c:
            if c.execute(update(policy_table).where(policy_table.c.id == 1).values(doc=doc, updated=time.time())).rowcount == 0:
                c.execute(insert(policy_table).values(id=1, doc=doc, updated=time.time()))

    def add_proposal(self, reason: dict[str, Any], state: str = "proposed") -> int:
        now = time.time()
        with self.engine.begin() as c:
            return int(c.execute(insert(proposals).values(created=now, updated=now, state=state, reason=reason))
                       .inserted_primary_key[0])

    def set_proposal(self, pid: int, **values: Any) -> None:
        with self.engine.begin() as c:
            c.execute(update(proposals).where(proposals.c.id == pid).values(updated=time.time(), **values))

    def proposals(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(select(proposals).order_by(proposals.c.id)).mappings()]

    def arrival_order(self, device_id: str) -> list[int]:
        """Sequence numbers in the order they were stored (tests check order and uniqueness)."""
        with self.engine.connect() as c:
            return [int(r[0]) for r in c.execute(
                select(telemetry.c.seq).where(telemetry.c.device_id == device_id).order_by(telemetry.c.id))]


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable: say so without echoing it
        return "<unparseable database URL>"


def _alembic_config(connection: Connection) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.attributes["connection"] = connection
    return cfg


def migrate(engine: Engine) -> str:
    """Upgrade the database to the newest revision, in place; returns it."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # replicas starting together: one migrates, the others wait
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        cfg = _alembic_config(conn)
        tables = set(inspect(conn).get_table_names())
        if "alembic_version" not in tables and {"devices", "telemetry"} <= tables:
            command.stamp(cfg, BASELINE)  # made by create_all before migrations existed
        command.upgrade(cfg, "head")
        return str(MigrationContext.configure(conn).get_current_revision())


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: not under migrations)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return str(ScriptDirectory(str(Path(__file__).parent / "migrations")).get_current_head())
