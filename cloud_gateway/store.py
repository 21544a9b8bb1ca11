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
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    create_engine,
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

BASELINE = "0001"  # the schema `create_all` made before migrations
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
