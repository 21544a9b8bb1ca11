"""The refresh policy: triggers on stored telemetry, proposals with reasons, approval runs the refresh command."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

import pytest

from cloud_gateway.policy import check_policy, triggers
from cloud_gateway.store import GatewayStore
from edgecore.errors import GatewayError
from tests.agent.tiny import retag_bundle, start_gateway, wait_for


def _window(seq: int, *, drift: bool, offload: float, inputs: int = 50, t_end: float | None = None) -> dict:
    return {"seq": seq, "boot": "b", "t_end": t_end if t_end is not None else time.time(),
            "counts": {"inputs": inputs, "cloud": int(offload * inputs), "fallback": 0},
            "offload_rate": offload, "fallback_rate": 0.0, "drift": {"flag": drift}}


def test_check_policy_fills_defaults_and_names_bad_fields():
    p = check_policy({"drift_windows": 3})
    assert p["action"] == "propose" and p["rollout"]["canary"] == "{device}"
    for bad, msg in (({"action": "deploy"}, "policy.action"), ({"drift_windows": -1}, "policy.drift_windows"),
                     ({"action": "run"}, "needs policy.refresh_command"), ({"colour": 1}, "unknown field"),
                     ({"rollout": {"promote_if": "offload <= 1"}}, "unknown metric"),
                     ({"refresh_command": "toolchain refresh"}, "list of strings")):
        with pytest.raises(GatewayError, match=msg):
            check_policy(bad)


def test_triggers_fire_on_drift_streaks_and_sustained_offload_only(tmp_path):
    store = GatewayStore(tmp_path / "s.sqlite")
    now = time.time()
    for i in range(6):
        store.telemetry.add("dev-a", _window(i, drift=i >= 2, offload=0.5, t_end=now - 60 + i))
        store.telemetry.add("dev-b", _window(i, drift=i % 2 == 0, offload=0.05, t_end=now - 60 + i))
    store.telemetry.add("dev-a", _window(6, drift=False, offload=0.0, inputs=0, t_end=now))  # idle: ignored
    # one device's say is not enough by default (a quorum of two distinct devices) ...
    assert triggers(store, check_policy({"drift_windows": 4, "offload_rate": 0.3, "offload_minutes": 5}), now) == []
    # ... unless the policy asks for one
    p = check_policy({"drift_windows": 4, "offload_rate": 0.3, "offload_minutes": 5, "offload_devices": 1,
                      "min_devices": 1})
    fired = {f["trigger"]: f for f in triggers(store, p, now)}
    assert fired["drift"]["devices"] == ["dev-a"] and "last 4 windows" in fired["drift"]["why"]
    assert fired["offload"]["devices"] == ["dev-a"] and fired["offload"]["offload_rates"] == {"dev-a": 0.5}
    assert triggers(store, check_policy({"drift_windows": 5, "offload_devices": 2, "offload_rate": 0.3}), now) == []


def test_triggers_and_proposals_are_per_model_line(tmp_path):
    """Two models' devices never add up to one trigger; each line gets its own proposal, naming the line."""
    from cloud_gateway.policy import PolicyEngine

    store = GatewayStore(tmp_path / "s.sqlite")
    now = time.time()
    for d, line in (("dev-a", "digits"), ("dev-b", "parts"), ("dev-c", "parts")):
        store.devices.set_status(d, {"state": "online", "model": line, "target": "onnx"})
    for i in range(3):
        store.telemetry.add("dev-a", _window(i, drift=False, offload=0.5, t_end=now - 30 + i))
        store.telemetry.add("dev-b", _window(i, drift=False, offload=0.5, t_end=now - 30 + i))
        store.telemetry.add("dev-c", _window(i, drift=False, offload=0.05, t_end=now - 30 + i))
    # two devices offload too much, but one per line: no line has the two the policy asks for
    assert triggers(store, check_policy({"drift_windows": 0, "offload_rate": 0.3, "offload_devices": 2}), now) == []
    fired = triggers(store, check_policy({"drift_windows": 0, "offload_rate": 0.3, "offload_devices": 1,
                                          "min_devices": 1}), now)
    assert [(f["line"], f["devices"]) for f in fired] == [("digits", ["dev-a"]), ("parts", ["dev-b"])]
    assert fired[1]["why"].startswith("model line parts: 1 device(s)")
    store.policy.set({"drift_windows": 0, "offload_rate": 0.3, "offload_devices": 1, "min_devices": 1})
    engine = PolicyEngine(store=store, gateway_url=lambda: "http://gw", start_rollout=lambda **k: 0,
                          upload=lambda *a: None)
    assert engine.evaluate(now) is not None and engine.evaluate(now) is None  # the cooldown is per line
    props = store.policy.proposals()
    assert [(x["reason"]["line"], x["reason"]["device"]) for x in props] == [("digits", "dev-a"), ("parts", "dev-b")]


@pytest.mark.broker
def test_a_proposal_is_recorded_then_approved_runs_the_refresh_command_and_a_rollout(mosquitto, tiny_cascade, tmp_path):
    run = tiny_cascade
    with start_gateway(mosquitto, run, tmp_path / "gw") as gw:
        url = gw.http_url
        # the refresh command: a stand-in for `toolchain refresh --json` that prints a report naming a signed bundle
        new = retag_bundle(run.bundle_dir, tmp_path / "refreshed", version="refreshed")
        script = tmp_path / "refresh.py"
        script.write_text("import json, sys\nprint('working')\n"
                          f"print(json.dumps({{'bundles': {{'onnx-int8': {str(tmp_path / 'refreshed')!r}}}, "
                          "'device': sys.argv[1]}))\n")
        policy = {"drift_windows": 3, "refresh_command": [sys.executable, str(script), "{device}"],
                  "rollout": {"canary": "{device}", "watch_s": 1, "promote_if": "rollbacks == 0"}}
        req = urllib.request.Request(f"{url}/api/policy", data=json.dumps(policy).encode(), method="PUT",
                                     headers={"Authorization": "Bearer test-token", "Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()
        for i in range(3):
            gw.store.telemetry.add("dev-z", _window(i, drift=True, offload=0.4))
        pid = gw.policy.evaluate()
        assert pid is not None and gw.policy.evaluate() is None  # the cooldown: one proposal, not one per round
        prop = gw.store.policy.proposals()[0]
        assert prop["state"] == "proposed" and prop["reason"]["device"] == "dev-z"  # propose only: nothing ran
        assert not list((tmp_path / "gw" / "bundles").glob("policy-*"))
        out = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{url}/api/policy/proposals/{pid}/approve", method="POST",
            headers={"Authorization": "Bearer test-token"}), timeout=10).read())
        assert out["state"] == "approved"
        wait_for(lambda: gw.store.policy.proposals()[0]["state"] not in ("approved", "refreshing"), 30,
                 "the approved run")
        res = gw.store.policy.proposals()[0]
        # the command ran and its bundle was verified and stored; dev-z is no real device, so the rollout is refused
        assert (tmp_path / "gw" / "bundles" / f"policy-{pid}-onnx-int8.tar.gz").is_file()
        assert res["state"] == "failed" and "dev-z (no status)" in res["result"]["error"], res
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(f"{url}/api/policy/proposals/{pid}/approve", method="POST",
                                                          headers={"Authorization": "Bearer test-token"}), timeout=10)
        assert e.value.code == 409
        assert new.is_file()


def _fleet(store, n: int, line: str = "digits") -> list[str]:
    ids = [f"dev-{i}" for i in range(n)]
    for d in ids:
        store.devices.set_status(d, {"state": "online", "model": line, "target": "onnx"})
    return ids


def test_one_device_cannot_trigger_a_refresh_of_its_line(tmp_path):
    """The quorum: one device flagging drift (or offloading everything) in a line of ten fires nothing; two do
    (``min_devices``), and ``min_share`` can ask for more; a line of one device is its own quorum."""
    from cloud_gateway.policy import quorum

    store = GatewayStore(tmp_path / "s.sqlite")
    now = time.time()
    ids = _fleet(store, 10)
    for i in range(5):
        store.telemetry.add(ids[0], _window(i, drift=True, offload=1.0, t_end=now - 30 + i))
    p = check_policy({"drift_windows": 3, "offload_rate": 0.3})
    assert triggers(store, p, now) == []
    for i in range(5):
        store.telemetry.add(ids[1], _window(i, drift=True, offload=1.0, t_end=now - 30 + i))
    fired = {f["trigger"]: f for f in triggers(store, p, now)}
    assert fired["drift"]["devices"] == ids[:2] and fired["drift"]["quorum"] == 2
    assert "2 of the 2 devices the quorum needs" in fired["drift"]["why"]
    assert triggers(store, check_policy({"drift_windows": 3, "min_share": 0.3}), now) == []  # 3 of 10 needed
    assert quorum(check_policy({}), 1) == 1 and quorum(check_policy({"min_share": 0.5}), 10) == 5
    with pytest.raises(GatewayError, match="policy.min_share"):
        check_policy({"min_share": 2})


def test_proposals_are_rate_limited_per_line(tmp_path):
    from cloud_gateway.policy import PolicyEngine

    store = GatewayStore(tmp_path / "s.sqlite")
    now = time.time()
    ids = _fleet(store, 2)
    for d in ids:
        for i in range(3):
            store.telemetry.add(d, _window(i, drift=True, offload=0.1, t_end=now - 30 + i))
    store.policy.set({"drift_windows": 3, "cooldown_minutes": 0, "max_proposals_per_day": 2})
    engine = PolicyEngine(store=store, gateway_url=lambda: "http://gw", start_rollout=lambda **k: 0,
                          upload=lambda *a: None)
    made = [engine.evaluate(now + k) for k in range(5)]
    assert sum(m is not None for m in made) == 2 and len(store.policy.proposals()) == 2


def test_a_refresh_is_never_rolled_out_to_only_the_devices_that_triggered_it(tmp_path):
    """``canary: "{device}"`` names a triggering device: another device of the line joins (drawn at random,
    seeded by the proposal); with no other device, only a person's approval lets it go on."""
    from cloud_gateway.policy import PolicyEngine

    store = GatewayStore(tmp_path / "s.sqlite")
    _fleet(store, 4)
    engine = PolicyEngine(store=store, gateway_url=lambda: "http://gw", start_rollout=lambda **k: 0,
                          upload=lambda *a: None)
    got = engine._canary("dev-0", ["dev-0", "dev-1"], "digits", 7, approved=False)
    assert got[0] == "dev-0" and got[1] in ("dev-2", "dev-3") and len(got) == 2
    assert got == engine._canary("dev-0", ["dev-0", "dev-1"], "digits", 7, approved=False)  # seeded by the proposal
    assert engine._canary("dev-2", ["dev-0"], "digits", 7, approved=False) == ["dev-2"]  # not a trigger: as named
    assert engine._canary("10%", ["dev-0"], "digits", 7, approved=False) == "10%"  # the rollout draws at random
    _fleet(store, 1, line="solo")  # dev-0 moves to a line of its own
    with pytest.raises(GatewayError, match=r"only canaries would be the devices that triggered the refresh \(dev-0\)"):
        engine._canary("dev-0", ["dev-0"], "solo", 7, approved=False)
    assert engine._canary("dev-0", ["dev-0"], "solo", 7, approved=True) == ["dev-0"]


def test_a_policy_round_reads_no_windows_of_devices_whose_last_window_rules_them_out(tmp_path):
    """Per-device queries each round were 10.8 s at 5,000 devices: a device whose last window had inputs and
    neither flagged drift nor offloaded past the limit cannot fire a trigger that needs every recent window to,
    so its windows are not read; the two that could are, and fire."""
    from sqlalchemy import event

    store = GatewayStore(tmp_path / "s.sqlite")
    now = time.time()
    ids = _fleet(store, 300)
    for d in ids[2:]:
        store.telemetry.add(d, _window(0, drift=False, offload=0.01, t_end=now - 5))
    for d in ids[:2]:
        for i in range(5):
            store.telemetry.add(d, _window(i, drift=True, offload=0.9, t_end=now - 5 + i))
    queries: list[str] = []
    event.listen(store.db.engine, "before_cursor_execute", lambda *a: queries.append(a[2]))
    p = check_policy({"drift_windows": 3, "offload_rate": 0.3, "offload_devices": 2})
    fired = {f["trigger"]: f for f in triggers(store, p, now)}
    assert fired["drift"]["devices"] == ids[:2] and fired["offload"]["devices"] == ids[:2]
    assert len(queries) <= 5, len(queries)  # the device list, then the two candidates' windows per trigger
