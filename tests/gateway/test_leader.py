"""One leader for fleet-wide work: exactly one gateway process drives rollouts and the policy; another takes
over when it dies (SQLite: a file lock the kernel releases; PostgreSQL: an advisory lock the server releases);
a rollout started through another replica's API is driven by the leader, and an abort asked of any replica
reaches it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud_gateway.leader import Leadership
from cloud_gateway.store import GatewayStore
from edgecore.errors import GatewayError

HOLD = """
import sys, time
from cloud_gateway.leader import Leadership
from cloud_gateway.store import GatewayStore
from edgecore.errors import GatewayError
lead = Leadership(GatewayStore(sys.argv[1]).db.engine)
print("held" if lead.try_acquire() else "not held", flush=True)
time.sleep(600)
"""


def _until(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _two(url: str) -> tuple[Leadership, Leadership]:
    return Leadership(GatewayStore(url).db.engine), Leadership(GatewayStore(url).db.engine)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "gw.sqlite")
    return request.getfixturevalue("postgres_url")


def test_one_holder_at_a_time_and_the_next_takes_over_on_release(db_url):
    a, b = _two(db_url)
    assert a.try_acquire() and a.held()
    assert not b.try_acquire() and not b.held()
    assert a.try_acquire()  # asking again while leading: still the leader
    a.release()
    assert not a.leading and b.try_acquire() and b.held()
    assert not a.try_acquire()
    b.release()


def test_a_killed_leader_releases_the_lock_with_nothing_to_clean(db_url, tmp_path):
    if db_url.endswith(".sqlite"):
        GatewayStore(db_url)  # (migrated before the child opens it)
    p = subprocess.Popen([sys.executable, "-c", HOLD, db_url], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        other = Leadership(GatewayStore(db_url).db.engine)
        assert not other.try_acquire()
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        assert _until(other.try_acquire), "the lock of a killed leader was never released"
        other.release()
    finally:
        p.kill()


def test_a_postgresql_leader_whose_connection_dies_stops_leading(postgres_url):
    from sqlalchemy import text

    a, b = _two(postgres_url)
    assert a.try_acquire()
    pid = a._conn.execute(text("SELECT pg_backend_pid()")).scalar()
    a._conn.commit()
    with b.engine.connect() as c:
        c.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        c.commit()
    assert not a.held() and not a.leading
    assert b.try_acquire()
    b.release()


def test_two_gateways_on_one_database_have_one_leader_and_the_other_takes_over(mosquitto, tiny_cascade, tmp_path):
    from tests.agent.tiny import start_gateway

    db = str(tmp_path / "shared.sqlite")
    g1 = start_gateway(mosquitto, tiny_cascade, tmp_path / "g1", replica="gw-1", db=db)
    g2 = start_gateway(mosquitto, tiny_cascade, tmp_path / "g2", replica="gw-2", db=db)
    try:
        g1.config.leader_poll_s = g2.config.leader_poll_s = 0.2
        assert g1.is_leader and not g2.is_leader
        assert g1.policy._thread is not None and g1.policy._thread.is_alive()
        assert g2.policy._thread is None  # the follower evaluates no policy
        g1.stop()
        assert _until(lambda: g2.is_leader, 15), "the follower never took over"
        assert _until(lambda: g2.policy._thread is not None and g2.policy._thread.is_alive(), 5)
    finally:
        g1.stop()
        g2.stop()


def _managers(tmp_path: Path):
    from cloud_gateway.rollout import RolloutManager

    store = GatewayStore(tmp_path / "gw.sqlite")
    sent: list = []
    made = []
    for leading in (True, False):
        m = RolloutManager(store=store, bundles_dir=tmp_path, send_command=lambda d, c: sent.append((d, c)),
                           base_url=lambda: "http://gw", update_timeout_s=30, poll_s=0.01)
        m.is_leader = (lambda v: lambda: v)(leading)
        made.append(m)
    return made[0], made[1], store, sent


def test_a_rollout_recorded_by_a_follower_is_driven_by_the_leader_and_an_abort_anywhere_reaches_it(tmp_path):
    leader, follower, store, sent = _managers(tmp_path)
    plan = {"canaries": ["dev-a"], "rest": [], "watch_s": 60, "promote_if": "rollbacks == 0",
            "manifest_sha256": "b" * 64, "line": "digits", "min_reports": 1,
            "previous": {"dev-a": {"manifest_sha256": "a" * 64, "bundle": "v1"}}}
    (tmp_path / "v2.tar.gz").write_bytes(b"x")
    (tmp_path / "v1.tar.gz").write_bytes(b"y")
    rid = store.rollouts.create("v2", plan, None)  # as `start` records it on a follower
    assert not follower._driven(rid)
    try:
        assert leader.adopt() == [rid] and leader.adopt() == []  # one thread per rollout
        assert _until(lambda: any(d == "dev-a" for d, _ in sent)), "the leader never sent the canary its update"
        follower.abort(rid)  # asked of another replica
        assert _until(lambda: (store.rollouts.get(rid) or {}).get("state") not in ("updating", "watching"), 10)
        steps = [s["step"] for s in store.rollouts.get(rid)["steps"]]
        assert "abort requested" in steps and "aborted" in steps
    finally:
        leader.stop()


# --- rollouts at fleet scale: one query per check, canaries rolled back together, offline devices listed ----

def test_a_rollout_check_reads_a_thousand_devices_in_two_queries_not_one_each(tmp_path):
    from sqlalchemy import event

    leader, _, store, _ = _managers(tmp_path)
    ids = [f"dev-{i:04d}" for i in range(1000)]
    for i, d in enumerate(ids):
        store.devices.set_status(d, {"bundle_sha256": "b" * 64 if i % 2 else "a" * 64, "state": "online"})
    queries: list[str] = []
    event.listen(store.db.engine, "before_cursor_execute", lambda *a: queries.append(a[2]))
    running = leader._running(ids, "b" * 64)
    assert len(running) == 500 and running[0] == "dev-0001"
    assert len(queries) == 2, queries  # 1000 ids in chunks of 500
    queries.clear()
    assert leader._refused(ids, "x") == {} and len(queries) == 2


def test_every_canary_is_rolled_back_at_once_under_one_timeout(tmp_path):
    leader, _, store, sent = _managers(tmp_path)
    leader.update_timeout_s = 1.0
    prev = {"dev-a": {"manifest_sha256": "a" * 64, "bundle": "v1"}, "dev-b": {"manifest_sha256": "c" * 64,
                                                                             "bundle": "v0"}}
    plan = {"canaries": ["dev-a", "dev-b"], "rest": [], "watch_s": 1, "promote_if": "rollbacks == 0",
            "manifest_sha256": "b" * 64, "line": "digits", "min_reports": 2, "previous": prev}
    for name in ("v0", "v1"):
        (tmp_path / f"{name}.tar.gz").write_bytes(name.encode())
    for d in prev:
        store.devices.set_status(d, {"bundle_sha256": "b" * 64})  # neither ever goes back
    rid = store.rollouts.create("v2", plan, None)
    store.rollouts.update(rid, state="rolling_back")
    store.rollouts.add_step(rid, "abort requested", {})  # an abort does not cut the rollback's wait short
    t0 = time.monotonic()
    leader._rolling_back(rid, store.rollouts.get(rid))
    elapsed = time.monotonic() - t0
    assert sorted((d, c["url"].rsplit("/", 1)[-1]) for d, c in sent) == [("dev-a", "v1"), ("dev-b", "v0")]
    assert 1.0 <= elapsed < 1.9, elapsed  # one timeout for both, not one each
    r = store.rollouts.get(rid)
    assert r["state"] == "failed" and r["steps"][-1]["detail"]["not_restored"] == ["dev-a", "dev-b"]


def test_offline_devices_are_listed_and_left_out_of_a_rollouts_fleet(tmp_path, tiny_cascade):
    import shutil

    from cloud_gateway.rollout import manifest_sha256_of
    from tests.agent.tiny import retag_bundle

    leader, follower, store, _ = _managers(tmp_path)
    shutil.copy(tiny_cascade.tarball, tmp_path / "v1.tar.gz")
    shutil.copy(retag_bundle(tiny_cascade.bundle_dir, tmp_path / "v2-dir", version="v2"), tmp_path / "v2.tar.gz")
    v1 = manifest_sha256_of(tmp_path / "v1.tar.gz")
    line = json.loads((tiny_cascade.bundle_dir / "manifest.json").read_text())["model"]["name"]
    for d, state in (("dev-a", "online"), ("dev-b", "online"), ("dev-c", "offline")):
        store.devices.set_status(d, {"state": state, "bundle_sha256": v1, "model": line, "target": "onnx"})
    rid = follower.start(bundle="v2", canary=["dev-a"], watch_s=1, promote_if="rollbacks == 0")
    r = store.rollouts.get(rid)
    assert r["plan"]["rest"] == ["dev-b"] and r["plan"]["excluded"] == {"offline": ["dev-c"]}
    assert [s["step"] for s in r["steps"]] == ["started", "queued for the leader"]  # a follower drives nothing
    assert not follower._driven(rid)
    with pytest.raises(GatewayError, match="not in this bundle's fleet: dev-c \\(offline\\)"):
        store.rollouts.update(rid, state="failed")
        follower.start(bundle="v2", canary=["dev-c"], watch_s=1, promote_if="rollbacks == 0")
