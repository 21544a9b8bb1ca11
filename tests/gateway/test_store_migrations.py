"""The store's schema is migrated in place with Alembic, on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import JSON, Column, Float, Integer, MetaData, String, Table, UniqueConstraint, create_engine, inspect

from cloud_gateway.store import GatewayStore, meta
from cloud_gateway.store.database import current_revision, db_url, head_revision


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'x.sqlite'}"
    return request.getfixturevalue("postgres_url")


def _pre_migration_store(url: str) -> None:
    """What the store made before migrations: `create_all` of these tables, with two windows in them."""
    old = MetaData()
    Table("devices", old, Column("device_id", String(64), primary_key=True), Column("status", JSON),
          Column("status_time", Float), Column("last_telemetry", JSON), Column("last_seen", Float))
    tel = Table("telemetry", old, Column("id", Integer, primary_key=True, autoincrement=True),
                Column("device_id", String(64), nullable=False, index=True), Column("seq", Integer, nullable=False),
                Column("t_end", Float), Column("received", Float, nullable=False), Column("payload", JSON, nullable=False),
                UniqueConstraint("device_id", "seq", name="uq_device_seq"))
    engine = create_engine(db_url(url))
    old.create_all(engine)
    with engine.begin() as c:
        for seq in (4, 5):
            c.execute(tel.insert().values(device_id="old", seq=seq, received=1.0, payload={"seq": seq, "kept": True}))
        devices = old.tables["devices"]
        c.execute(devices.insert().values(device_id="old", status={"state": "online", "model": "digits"}))
        c.execute(devices.insert().values(device_id="mute", status={"state": "offline"}))
    engine.dispose()


def _indexes(engine) -> set[str]:
    return {ix["name"] for ix in inspect(engine).get_indexes("telemetry") if not ix.get("duplicates_constraint")}


def test_an_existing_store_is_upgraded_in_place(store_url):
    _pre_migration_store(store_url)
    engine = create_engine(db_url(store_url))
    assert current_revision(engine) is None and _indexes(engine) == {"ix_telemetry_device_id"}
    st = GatewayStore(store_url)
    assert current_revision(st.db.engine) == head_revision() == "0010"
    assert _indexes(st.db.engine) == {"ix_telemetry_device_id_id", "ix_telemetry_t_end"}
    # each device's model line is filled from the status it held (none where the status names no model) ...
    assert {d["device_id"]: d["model_line"] for d in st.devices.all()} == {"mute": None, "old": "digits"}
    # ... and an offline status (the last will names no model) does not forget it
    st.devices.set_status("old", {"state": "offline"})
    assert st.devices.get("old")["model_line"] == "digits"
    # the data survived (boot '' for the old rows), and the dedupe key is now (device, boot, seq)
    assert st.telemetry.arrival_order("old") == [4, 5] and st.telemetry.history("old")[0]["kept"] is True
    assert not st.telemetry.add("old", {"seq": 5}) and st.telemetry.add("old", {"seq": 6})
    assert st.telemetry.add("old", {"seq": 5, "boot": "b2"}) and not st.telemetry.add("old", {"seq": 5, "boot": "b2"})
    assert GatewayStore(store_url).telemetry.arrival_order("old") == [4, 5, 6, 5]  # reopening at head changes nothing


def test_a_store_with_boot_but_no_migrations_is_adopted(store_url):
    """Made by the gateway version that added `boot` with create_all, before migrations: upgraded, data kept."""
    from sqlalchemy import insert

    interim = MetaData()
    tel = Table("telemetry", interim, Column("id", Integer, primary_key=True, autoincrement=True),
                Column("device_id", String(64), nullable=False, index=True),
                Column("boot", String(32), nullable=False, server_default=""), Column("seq", Integer, nullable=False),
                Column("t_end", Float), Column("received", Float, nullable=False), Column("payload", JSON, nullable=False),
                UniqueConstraint("device_id", "boot", "seq", name="uq_device_boot_seq"))
    Table("devices", interim, Column("device_id", String(64), primary_key=True), Column("status", JSON),
          Column("status_time", Float), Column("last_telemetry", JSON), Column("last_seen", Float))
    engine = create_engine(db_url(store_url))
    interim.create_all(engine)
    with engine.begin() as c:
        c.execute(insert(tel).values(device_id="d", boot="b1", seq=0, received=1.0, payload={"seq": 0}))
    engine.dispose()
    st = GatewayStore(store_url)
    assert current_revision(st.db.engine) == head_revision()
    assert not st.telemetry.add("d", {"seq": 0, "boot": "b1"}) and st.telemetry.add("d", {"seq": 0, "boot": "b2"})
    assert st.telemetry.arrival_order("d") == [0, 0]


def test_migrations_build_exactly_the_schema_the_code_uses(store_url):
    """A column or index added to a table in cloud_gateway/store/ without a migration (or the reverse) fails here."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    st = GatewayStore(store_url)
    with st.db.engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c), meta)
    assert diff == []


def test_replicas_opening_a_new_store_together_migrate_once(store_url):
    if store_url.startswith("sqlite"):
        pytest.skip("concurrent first start is guarded by a PostgreSQL advisory lock; SQLite serves one host")
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            GatewayStore(store_url).telemetry.add("d", {"seq": 1})
        except BaseException as e:  # collected, reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert current_revision(create_engine(db_url(store_url))) == head_revision()
    assert GatewayStore(store_url).telemetry.arrival_order("d") == [1]
