"""A canary is not a trusted witness: what devices report only ever stops a rollout; the gateway's own evaluation
of the bundle (or a person) promotes it. Canaries are drawn at random (seeded, recorded); a promotion needs
reports from enough distinct canaries; a rollback is done only when every canary confirms its old bundle.

The manager is driven state by state on a real SQLite store (no threads); `test_a_healthy_looking_but_wrong_
bundle_is_stopped_by_the_gateways_own_evaluation` runs the whole path with real agents, broker and gateway."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_gateway.rollout import RolloutManager
from edgecore.errors import GatewayError

SHA_OLD, SHA_NEW = "a" * 64, "b" * 64


def _manager(tmp_path: Path, evaluate=None) -> tuple[RolloutManager, Any, list]:
    from cloud_gateway.store import GatewayStore

    store = GatewayStore(tmp_path / "gw.sqlite")
    sent: list = []
    m = RolloutManager(store=store, bundles_dir=tmp_path, send_command=lambda d, c: sent.append((d, c)),
                       base_url=lambda: "http://gw", update_timeout_s=0.3, poll_s=0.01, evaluate=evaluate)
    return m, store, sent


def _rollout(store, canaries: list[str], *, min_reports: int | None = None) -> int:
    plan = {"canaries": canaries, "rest": ["dev-z"], "watch_s": 0.01, "promote_if": "rollbacks == 0",
            "manifest_sha256": SHA_NEW, "line": "digits",
            "previous": {d: {"manifest_sha256": SHA_OLD, "bundle": "v1"} for d in canaries},
            "min_reports": min_reports or len(canaries)}
    rid = store.rollouts.create("v2", plan, {"offload_rate": 0.1})
    store.rollouts.update(rid, state="watching", result={"watch_from": time.time() - 1})
    for d in canaries:
        store.devices.set_status(d, {"state": "online", "bundle_sha256": SHA_NEW, "model": "digits"})
    return rid


def _window(store, device: str, seq: int, *, inputs: int = 100, cloud: int = 5) -> None:
    now = time.time()
    store.telemetry.add(device, {"seq": seq, "t_start": now - 0.5, "t_end": now,
                                 "counts": {"inputs": inputs, "edge": inputs - cloud, "cloud": cloud, "rollbacks": 0}})


def _step(m: RolloutManager, store, rid: int) -> dict:
    r = store.rollouts.get(rid)
    getattr(m, f"_{r['state']}")(rid, r)
    return store.rollouts.get(rid)


def _steps(store, rid: int) -> list[str]:
    return [s["step"] for s in store.rollouts.get(rid)["steps"]]


def test_device_reports_alone_never_promote_a_bundle(tmp_path):
    """Canaries that report perfect figures: without the gateway's own evidence the rollout waits for a person."""
    m, store, _ = _manager(tmp_path, evaluate=None)
    rid = _rollout(store, ["dev-a"])
    _window(store, "dev-a", 1)
    r = _step(m, store, rid)
    assert r["state"] == "awaiting_approval" and _steps(store, rid)[-2:] == ["condition met",
                                                                           "awaiting a person's approval"]
    _step(m, store, rid)  # waiting does nothing by itself
    assert store.rollouts.get(rid)["state"] == "awaiting_approval"
    m.approve(rid, by="test")
    assert store.rollouts.get(rid)["state"] == "promoting" and _steps(store, rid)[-1] == "approved by test"
    with pytest.raises(GatewayError, match="is not waiting for an approval"):
        m.approve(rid)


def test_the_gateways_evaluation_decides_and_its_figures_are_recorded(tmp_path):
    verdicts = iter([{"ok": False, "why": "collected inputs: 9.70% against 97.10% (87.40 pt lost, at most 1)",
                      "sources": {}}, {"ok": True, "why": None, "sources": {}}])
    seen: list = []

    def evaluate(candidate: Path, previous: Path | None, devices: list[str]) -> dict:
        seen.append((candidate.name, previous.name if previous else None, devices))
        return next(verdicts)

    m, store, _ = _manager(tmp_path, evaluate=evaluate)
    bad = _rollout(store, ["dev-a"])
    _window(store, "dev-a", 1)
    assert _step(m, store, bad)["state"] == "rolling_back"
    assert _steps(store, bad)[-1] == "gateway evaluation failed"
    assert store.rollouts.get(bad)["result"]["evaluation"]["why"].startswith("collected inputs: 9.70%")
    assert seen == [("v2.tar.gz", "v1.tar.gz", ["dev-a", "dev-z"])]  # against what the canaries ran, on the line's inputs
    store.rollouts.update(bad, state="rolled_back")
    good = _rollout(store, ["dev-b"])
    _window(store, "dev-b", 1)
    assert _step(m, store, good)["state"] == "promoting" and _steps(store, good)[-1] == "gateway evaluation passed"


def test_no_evidence_or_a_target_the_gateway_cannot_run_waits_for_a_person(tmp_path):
    from cloud_gateway.evaluate import NoEvidence
    from edgecore.errors import TargetUnavailableError

    for err in (NoEvidence("the gateway holds no inputs to evaluate the bundle on"),
                TargetUnavailableError("bundle is for target 'jetson', which this device cannot run")):
        def evaluate(c, p, d, err=err):
            raise err

        m, store, _ = _manager(tmp_path / type(err).__name__, evaluate=evaluate)
        rid = _rollout(store, ["dev-a"])
        _window(store, "dev-a", 1)
        r = _step(m, store, rid)
        assert r["state"] == "awaiting_approval"
        assert r["steps"][-1]["detail"]["why"] == str(err)
        m.abort(rid)
        assert _step(m, store, rid)["state"] == "rolling_back"


def test_a_promotion_needs_reports_from_enough_distinct_canaries(tmp_path):
    m, store, _ = _manager(tmp_path, evaluate=lambda c, p, d: {"ok": True, "sources": {}})
    rid = _rollout(store, ["dev-a", "dev-b", "dev-c"])  # all three must report (the default)
    for seq in range(5):  # one canary's windows, however many, are one witness
        _window(store, "dev-a", seq)
    r = _step(m, store, rid)
    assert r["state"] == "rolling_back" and _steps(store, rid)[-1] == "too few canaries reported"
    detail = r["steps"][-1]["detail"]
    assert detail["reported"] == ["dev-a"] and detail["silent"] == ["dev-b", "dev-c"] and detail["min_reports"] == 3
    rid2 = _rollout(store, ["dev-d", "dev-e"], min_reports=1)
    _window(store, "dev-d", 1)
    assert _step(m, store, rid2)["state"] == "promoting"


def test_canaries_are_drawn_at_random_with_a_recorded_seed():
    known = [f"dev-{i:03d}" for i in range(100)]
    draws = {s: RolloutManager._canaries("10%", known, {}, seed=s) for s in range(20)}
    assert all(len(d) == 10 and set(d) <= set(known) for d in draws.values())
    assert draws[3] == RolloutManager._canaries("10%", known, {}, seed=3)  # the seed repeats the draw
    assert len({tuple(d) for d in draws.values()}) == 20  # different seeds, different canaries
    assert sum(d == known[:10] for d in draws.values()) == 0  # not the first ids in sort order
    # a device cannot make itself a canary by its name: "aaa" is picked about as often as anyone else
    picked = sum("dev-000" in RolloutManager._canaries("10%", known, {}, seed=s) for s in range(400))
    assert 15 <= picked <= 70, picked


def test_a_rollback_is_done_only_when_every_canary_confirms_its_previous_bundle(tmp_path):
    m, store, sent = _manager(tmp_path)
    plan = {"canaries": ["dev-a", "dev-b"], "rest": [], "watch_s": 1, "promote_if": "rollbacks == 0",
            "manifest_sha256": SHA_NEW, "line": "digits", "min_reports": 2,
            "previous": {d: {"manifest_sha256": SHA_OLD, "bundle": "v1"} for d in ("dev-a", "dev-b")}}
    rid = store.rollouts.create("v2", plan, None)
    store.rollouts.update(rid, state="rolling_back")
    (tmp_path / "v1.tar.gz").write_bytes(b"x")  # (only its hash is read when sending)
    store.devices.set_status("dev-a", {"bundle_sha256": SHA_OLD})  # back on its old bundle
    store.devices.set_status("dev-b", {"bundle_sha256": SHA_NEW})  # never goes back (lost, or lying)
    r = _step(m, store, rid)
    assert r["state"] == "failed" and _steps(store, rid)[-1] == "rollback incomplete"
    detail = r["steps"][-1]["detail"]
    assert detail["not_restored"] == ["dev-b"] and "dev-b" in detail["why_not"]
    assert [(d, c["cmd"], c.get("rollback")) for d, c in sent] == [("dev-b", "update_bundle", True)]  # told to go back


def test_the_api_starts_with_a_seed_and_a_quorum_and_approves(tmp_path):
    """``canary_seed`` / ``min_reports`` reach the plan; bad values are a 400; approve is a token route."""
    from cloud_gateway.api import create_app
    from cloud_gateway.store import GatewayStore

    calls: list = []

    class Rollouts:
        def start(self, **kw):
            calls.append(kw)
            return 7

        def approve(self, rid):
            calls.append(("approve", rid))

    from cloud_gateway.metrics import Metrics

    app = create_app(store=GatewayStore(tmp_path / "g.sqlite"), metrics=Metrics(), bundles_dir=tmp_path / "b",
                     token="tok", rollouts=Rollouts())
    c = app.test_client()
    h = {"Authorization": "Bearer tok"}
    r = c.post("/api/rollouts", json={"bundle": "v2", "canary": "10%", "watch_s": 5, "canary_seed": 42,
                                      "min_reports": 2}, headers=h)
    assert r.status_code == 201 and calls[-1]["canary_seed"] == 42 and calls[-1]["min_reports"] == 2
    # no condition given: the same default as the command line's (one home, `config.DEFAULT_PROMOTE_IF`)
    from cloud_gateway.cli import build_parser
    from cloud_gateway.config import DEFAULT_PROMOTE_IF

    assert calls[-1]["promote_if"] == DEFAULT_PROMOTE_IF
    assert build_parser().parse_args(["rollout", "list"]).promote_if == DEFAULT_PROMOTE_IF
    for bad in ({"canary_seed": -1}, {"min_reports": "2"}, {"canary_seed": True}):
        r = c.post("/api/rollouts", json={"bundle": "v2", "canary": "10%", "watch_s": 5, **bad}, headers=h)
        assert r.status_code == 400, bad
    assert c.post("/api/rollouts/7/approve").status_code == 401
    assert c.post("/api/rollouts/7/approve", headers=h).status_code == 200 and calls[-1] == ("approve", 7)


def _rolled_model(student_onnx: Path) -> bytes:
    """The student with its class columns rolled by one: as sure of itself as ever, and wrong on every input."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(student_onnx))
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.ndim >= 1 and a.shape[-1] == 10:
            init.CopyFrom(numpy_helper.from_array(np.roll(a, 1, axis=-1), init.name))
    return m.SerializeToString()


@pytest.mark.broker
def test_a_healthy_looking_but_wrong_bundle_is_stopped_by_the_gateways_own_evaluation(mosquitto, tiny_cascade,
                                                                                         tmp_path):
    """A bundle whose canary reports nothing wrong (no rollbacks, the usual offload) but answers the wrong class on
    every input: the device-side condition holds, the gateway's evaluation on the collected inputs (teacher's
    labels) fails it, and the canary goes back. A faithful copy of the running bundle passes the same check."""
    from cloud_gateway.config import CollectionPolicy
    from tests.agent.tiny import retag_bundle, start_gateway, wait_for
    from tests.gateway.test_rollout import Fleet, _call, _upload, _wait_state

    run = tiny_cascade
    gw = start_gateway(mosquitto, run, tmp_path / "gw", collect=CollectionPolicy.parse("all", rate=1.0))
    gw.rollouts.update_timeout_s = 15
    url = gw.http_url
    fleet = Fleet(mosquitto, run, tmp_path, url, ids=("dev-a", "dev-b"))
    try:
        _upload(url, "v1", run.tarball)
        _upload(url, "v2", retag_bundle(run.bundle_dir, tmp_path / "v2", version="v2"))
        _upload(url, "wrong", retag_bundle(run.bundle_dir, tmp_path / "wrong", version="wrong",
                                           model_bytes=_rolled_model(run.bundle_dir / "model.onnx")))
        wait_for(lambda: len(gw.store.samples.rows(limit=100)) >= 40, 30, "collected inputs")
        rid = _call("POST", f"{url}/api/rollouts", {"bundle": "wrong", "canary": ["dev-a"], "watch_s": 1.5,
                                                    "promote_if": "rollbacks == 0 and offload_rate <= baseline + 0.3"})["id"]
        r = _wait_state(url, rid, {"done", "rolled_back", "failed", "awaiting_approval"})
        steps = [s["step"] for s in r["steps"]]
        assert r["state"] == "rolled_back" and "condition met" in steps and "gateway evaluation failed" in steps, steps
        ev = r["result"]["evaluation"]["sources"]["collected inputs"]
        assert ev["used"] and ev["candidate"] < 0.2 and ev["previous"] > 0.8 and not ev["ok"], ev
        wait_for(lambda: len(set(fleet.shas().values())) == 1, 15, "the canary back on its old bundle")

        rid = _call("POST", f"{url}/api/rollouts", {"bundle": "v2", "canary": "50%", "watch_s": 1.5, "canary_seed": 7,
                                                    "promote_if": "rollbacks == 0"})["id"]
        r = _wait_state(url, rid, {"done", "rolled_back", "failed", "awaiting_approval"})
        steps = [s["step"] for s in r["steps"]]
        assert r["state"] == "done", steps
        assert steps == ["started", "canaries updated", "condition met", "gateway evaluation passed",
                         "promoted to the fleet"]
        assert r["plan"]["canary_seed"] == 7 and len(r["plan"]["canaries"]) == 1
    finally:
        fleet.close()
        gw.stop()
