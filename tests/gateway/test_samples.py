"""Collected samples: opt-in collection at the gateway, bounds, deletion, the labelling queue, the API contract."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from cloud_gateway.config import CollectionPolicy
from cloud_gateway.store import GatewayStore
from cloud_gateway.store.database import current_revision, head_revision
from edgecore.errors import GatewayError
from edgecore.samples import SamplePage
from tests.agent.tiny import items, make_agent, start_gateway, wait_for

pytestmark = pytest.mark.broker
TOKEN = {"Authorization": "Bearer test-token"}


def _get(url: str, *, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(url, data=body, method=method, headers={**TOKEN, **(headers or {})})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _offload(broker, run, tmp_path, device: str, n: int, **agent_kw):
    with make_agent(broker, run.bundle_dir, device, tmp_path, threshold=1.01, deadline_s=3.0, **agent_kw) as agent:
        return list(agent.run(items(run.x_test[:n], run.y_test[:n])))


def test_collection_is_off_by_default(mosquitto, tiny_cascade, tmp_path):
    with start_gateway(mosquitto, tiny_cascade, tmp_path, http=False) as gw:
        _offload(mosquitto, tiny_cascade, tmp_path, "dev-a", 10)
        assert gw.worker.served == 10
        assert gw.store.samples.rows(limit=100) == []


def test_named_devices_are_collected_with_every_field_and_served_through_the_api(mosquitto, tiny_cascade, tmp_path):
    run = tiny_cascade
    policy = CollectionPolicy.parse("dev-a")
    with start_gateway(mosquitto, run, tmp_path, collect=policy) as gw:
        _offload(mosquitto, run, tmp_path, "dev-a", 12)
        _offload(mosquitto, run, tmp_path, "dev-b", 5)  # not named: answered, never stored
        wait_for(lambda: len(gw.store.samples.rows(limit=100)) == 12, 10, "12 collected samples")
        page = SamplePage.from_json(_get(f"{gw.http_url}/api/samples?limit=5"))
        assert len(page.samples) == 5 and page.next_after == page.samples[-1].id
        rest = SamplePage.from_json(_get(f"{gw.http_url}/api/samples?after={page.next_after}&limit=100"))
        samples = page.samples + rest.samples
        assert rest.next_after is None and len(samples) == 12 and {s.device for s in samples} == {"dev-a"}
        x = run.spec.preprocess(run.x_test[:12])
        sent = x.reshape(len(x), -1)
        for s in samples:  # each input exactly as the device sent it (the order of arrival may differ)
            assert np.isclose(sent, s.input.reshape(1, -1), rtol=1e-6).all(axis=1).any()
            assert s.teacher_probs.shape == (10,) and abs(float(s.teacher_probs.sum()) - 1) < 1e-3
            assert s.bundle and 0.0 <= s.confidence <= 1.0 and s.received > 0 and s.flagged is False
        stats = _get(f"{gw.http_url}/api/samples/stats")
        assert stats["devices"][0]["samples"] == 12 and stats["collection"]["devices"] == ["dev-a"]
        with pytest.raises(urllib.error.HTTPError) as e:  # user data: the token is required
            urllib.request.urlopen(f"{gw.http_url}/api/samples", timeout=5)
        assert e.value.code in (401, 403)


def test_rate_zero_collects_only_what_the_device_flags(mosquitto, tiny_cascade, tmp_path):
    run = tiny_cascade
    with start_gateway(mosquitto, run, tmp_path, http=False, collect=CollectionPolicy.parse("all", rate=0.0)) as gw:
        _offload(mosquitto, run, tmp_path, "dev-a", 8)
        assert gw.worker.served == 8
        gw.collector.flush()
        assert gw.store.samples.rows(limit=100) == []
        # a drifted device flags its offloads: those are collected whatever the rate
        with make_agent(mosquitto, run.bundle_dir, "dev-b", tmp_path, threshold=1.01, deadline_s=3.0) as agent:
            agent.telemetry.last_drift = {"flag": True}
            list(agent.run(items(run.x_test[:6], run.y_test[:6])))
        wait_for(lambda: len(gw.store.samples.rows(limit=100)) == 6, 10, "6 flagged samples")
        assert all(r["flagged"] and r["device_id"] == "dev-b" for r in gw.store.samples.rows(limit=100))


def test_bounds_evict_the_oldest_and_delete_is_per_device(tmp_path):
    store = GatewayStore(tmp_path / "s.sqlite")
    from cloud_gateway.collection import SampleCollector
    from cloud_gateway.metrics import Metrics

    col = SampleCollector(store, CollectionPolicy.parse("all", max_per_device=5, max_total=8), Metrics()).start()
    try:
        for d in ("a", "b"):
            for i in range(7):
                col.offer(d, np.full((1, 2), i, np.float32), [0.1, 0.9], confidence=0.5, flagged=False)
        col.flush()
        col.trim()
    finally:
        col.stop()
    rows = store.samples.rows(limit=100)
    per = {d: [int(r["input"][-1]) for r in rows if r["device_id"] == d] for d in ("a", "b")}
    assert len(rows) == 8 and all(len(v) <= 5 for v in per.values())
    kept = [json.loads(json.dumps(r["id"])) for r in rows]
    assert kept == sorted(kept)  # the newest kept
    r = subprocess.run([sys.executable, "-m", "cloud_gateway.cli", "samples", "delete", "--device", "a", "--db",
                        str(tmp_path / "s.sqlite"), "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["deleted"] == len(per["a"])
    assert {x["device_id"] for x in store.samples.rows(limit=100)} == {"b"}


def test_labelling_queue_orders_by_uncertainty_and_a_human_label_overrides(mosquitto, tiny_cascade, tmp_path):
    from cloud_gateway.collection import SampleCollector
    from cloud_gateway.metrics import Metrics

    with start_gateway(mosquitto, tiny_cascade, tmp_path) as gw:
        col = SampleCollector(gw.store, CollectionPolicy.parse("all"), Metrics()).start()
        for probs in ([0.5, 0.5] + [0.0] * 8, [0.9, 0.1] + [0.0] * 8, [0.4, 0.3, 0.3] + [0.0] * 7):
            col.offer("dev-a", np.zeros((1, 8, 8), np.float32), probs, confidence=None, flagged=False)
        col.flush()
        col.stop()
        q = SamplePage.from_json(_get(f"{gw.http_url}/api/labels/queue?min_uncertainty=0.3"))
        assert [round(s.uncertainty, 2) for s in q.samples] == [0.6, 0.5]  # the confident one is not queued
        top = q.samples[0]
        assert _get(f"{gw.http_url}/api/samples/{top.id}/label", method="POST", body=b'{"label": 7}',
                    headers={"Content-Type": "application/json"}) == {"id": top.id, "human_label": 7}
        page = SamplePage.from_json(_get(f"{gw.http_url}/api/samples"))
        labelled = next(s for s in page.samples if s.id == top.id)
        assert labelled.label == 7 and labelled.teacher_label == 0  # a person's label wins
        q2 = SamplePage.from_json(_get(f"{gw.http_url}/api/labels/queue?min_uncertainty=0.3"))
        assert [s.id for s in q2.samples] == [q.samples[1].id]
        for bad in (b'{"label": 10}', b'{"label": true}', b'nonsense'):
            with pytest.raises(urllib.error.HTTPError) as e:
                _get(f"{gw.http_url}/api/samples/{top.id}/label", method="POST", body=bad,
                     headers={"Content-Type": "application/json"})
            assert e.value.code == 400


def test_policy_parse_refuses_bad_settings():
    assert not CollectionPolicy.parse(None).enabled and CollectionPolicy.parse("all").covers("x")
    for kw in ({"rate": 1.5}, {"max_total": 0}, {"retention_days": -1}):
        with pytest.raises(GatewayError):
            CollectionPolicy.parse("all", **kw)


def test_store_upgrades_in_place_to_the_samples_revision(tmp_path):
    from alembic import command

    from cloud_gateway.store.database import _alembic_config

    store = GatewayStore(tmp_path / "old.sqlite")
    with store.db.engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0003")
    assert current_revision(store.db.engine) == "0003"
    store2 = GatewayStore(tmp_path / "old.sqlite")
    assert current_revision(store2.db.engine) == head_revision() and store2.samples.rows() == []


def test_samples_on_postgresql(postgres_url):
    from cloud_gateway.collection import SampleCollector
    from cloud_gateway.metrics import Metrics

    store = GatewayStore(postgres_url)
    assert current_revision(store.db.engine) == head_revision()
    col = SampleCollector(store, CollectionPolicy.parse("all", max_per_device=3), Metrics()).start()
    try:
        for i in range(5):
            col.offer("pg-dev", np.full((1, 4), i, np.float32), [0.3, 0.7], confidence=0.2, flagged=i == 4)
        col.flush()
        col.trim()
    finally:
        col.stop()
    rows = store.samples.rows(limit=10, device="pg-dev")
    assert len(rows) == 3 and rows[-1]["flagged"] is True
    assert store.samples.label(rows[0]["id"], 0) and store.samples.rows(limit=10, queue=0.2)[0]["id"] == rows[1]["id"]
    assert store.samples.stats() == [{"device": "pg-dev", "samples": 3, "labelled": 1,
                                     "oldest": rows[0]["received"], "newest": rows[-1]["received"]}]
    assert store.samples.delete("pg-dev") == 3


def test_a_drifted_device_also_sends_a_share_of_its_confident_inputs_and_they_are_collected(
        mosquitto, tiny_cascade, tmp_path):
    from device_agent.agent import Route

    run = tiny_cascade
    with start_gateway(mosquitto, run, tmp_path, http=False, collect=CollectionPolicy.parse("dev-a", rate=0.0)) as gw:
        with make_agent(mosquitto, run.bundle_dir, "dev-a", tmp_path, threshold=0.0, deadline_s=3.0) as agent:
            calm = list(agent.run(items(run.x_test[:8], run.y_test[:8])))
            agent.telemetry.last_drift = {"flag": True}  # the drift tests fired
            drifting = list(agent.run(items(run.x_test[:8], run.y_test[:8])))
        assert all(a.route is Route.EDGE for a in calm)  # threshold 0: sure of everything
        assert sum(a.route is Route.CLOUD for a in drifting) == 2  # drift_offload 0.25: every 4th sure input
        wait_for(lambda: len(gw.store.samples.rows(limit=100)) == 2, 10, "2 collected")
        assert all(r["flagged"] for r in gw.store.samples.rows(limit=100))


def _fill(store, device: str, n: int, *, labelled: int = 0, t0: float = 0.0) -> list[int]:
    """``n`` samples of ``device`` (the first ``labelled`` of them labelled by a person); their ids."""
    blob = bytes(16)
    store.samples.add([{"device_id": device, "bundle": "1", "received": t0 + i, "input": blob,
                        "teacher_probs": blob, "teacher_label": 0, "uncertainty": 0.5, "confidence": 0.5,
                        "drift": False, "flagged": False} for i in range(n)])
    ids = [r["id"] for r in store.samples.rows(limit=n + 1_000_000, device=device)][-n:]
    for i in ids[:labelled]:
        store.samples.label(i, 3)
    return ids


def test_one_devices_flood_never_evicts_another_devices_samples_or_labels(tmp_path):
    """A victim with 150 samples (5 labelled by a person) keeps all of them while a flooder overfills the total
    bound: the flooder loses its own oldest samples. (Evicting oldest-first across the fleet took the victim to
    100 samples and 0 labels.)"""
    store = GatewayStore(tmp_path / "s.sqlite")
    now = time.time()
    victim = _fill(store, "victim", 150, labelled=5, t0=now - 10_000)  # older than every flooded sample
    _fill(store, "flooder", 3000, labelled=2, t0=now - 5_000)
    store.samples.trim(max_per_device=10_000, max_total=1000, older_than=None)
    stats = {s["device"]: s for s in store.samples.stats()}
    assert stats["victim"]["samples"] == 150 and stats["victim"]["labelled"] == 5
    assert stats["flooder"]["samples"] == 850 and stats["flooder"]["labelled"] == 2  # its own unlabelled went
    assert [r["id"] for r in store.samples.rows(limit=1000, device="victim")] == victim
    kept = [r["received"] for r in store.samples.rows(limit=1000, device="flooder") if r["human_label"] is None]
    assert min(kept) == now - 5_000 + 3000 - 848  # the flooder's newest unlabelled ones stayed
    # two floods: each is cut to the same fair level, the small device still untouched
    _fill(store, "flooder-2", 2000, t0=now)
    store.samples.trim(max_per_device=10_000, max_total=1000, older_than=None)
    stats = {s["device"]: s for s in store.samples.stats()}
    assert (stats["victim"]["samples"], stats["victim"]["labelled"]) == (150, 5)
    assert stats["flooder"]["samples"] + stats["flooder-2"]["samples"] == 850
    unlabelled = [stats[d]["samples"] - stats[d]["labelled"] for d in ("flooder", "flooder-2")]
    assert abs(unlabelled[0] - unlabelled[1]) <= 1 and stats["flooder"]["labelled"] == 2
    # a device over its own bound loses its own unlabelled samples before its labels
    store.samples.trim(max_per_device=100, max_total=1000, older_than=None)
    stats = {s["device"]: s for s in store.samples.stats()}
    assert (stats["victim"]["samples"], stats["victim"]["labelled"]) == (100, 5)


def test_one_devices_burst_never_fills_the_collection_queue_for_the_others(tmp_path):
    """The rows wait in one bounded queue for the writer: a device's burst takes at most its share of it, and
    the other devices' rows still get in (a shared queue dropped them all while the flooder's filled it)."""
    from cloud_gateway.collection import SampleCollector
    from cloud_gateway.metrics import Metrics

    store = GatewayStore(tmp_path / "s.sqlite")
    metrics = Metrics(per_device=True)  # the per-device series, as --metrics-per-device renders them
    col = SampleCollector(store, CollectionPolicy.parse("all"), metrics, queue_size=64)  # writer not started
    for _ in range(500):
        col.offer("flooder", np.zeros((1, 2), np.float32), [0.5, 0.5], confidence=0.5, flagged=False)
    for _ in range(5):
        col.offer("victim", np.zeros((1, 2), np.float32), [0.5, 0.5], confidence=0.5, flagged=False)
    col.start()
    col.flush()
    col.stop()
    stats = {s["device"]: s["samples"] for s in store.samples.stats()}
    assert stats == {"flooder": 8, "victim": 5}  # the flooder's share is an eighth of the queue
    assert 'gateway_samples_dropped_total{device="flooder"} 492' in metrics.render()
    assert 'device="victim"' not in metrics.render().split("gateway_samples_dropped_total")[-1]
