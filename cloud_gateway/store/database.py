"""The gateway store's one database: SQLite file by default, PostgreSQL (or any SQLAlchemy URL) in production.

`Database` opens the engine every per-table store shares. Several gateway
replicas can share one database.

The schema is versioned with Alembic (``cloud_gateway/migrations``): opening a
store upgrades it in place to the newest revision, under a PostgreSQL advisory
lock so replicas starting together migrate once. A store made before migrations
existed (tables, no ``alembic_version``) is stamped as the baseline first.
The tables (each beside its store in this package, all on `meta`) describe the
newest revision; they are never ``create_all``-ed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, MetaData, create_engine, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from edgecore.errors import GatewayError

meta = MetaData()
BASELINE = "0001"  # the schema `create_all` made before migrations
MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"
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


class Database:
    """The engine, opened and migrated to the newest revision."""

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
    cfg.set_main_option("script_location", str(MIGRATIONS))
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

    return str(ScriptDirectory(str(MIGRATIONS)).get_current_head())
