"""Staged rollouts through a real Mosquitto, a real gateway and real agents: promote, roll back, survive a kill."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cloud_gateway.config import CollectionPolicy
from cloud_gateway.rollout import aggregate, parse_condition, watch_metrics
from edgecore.errors import GatewayError
from tests.agent.tiny import (
    command_key_paths,
    items,
    make_agent,
    release_pub_path,
    retag_bundle,
    start_gateway,
    wait_for,
)

pytestmark = pytest.mark.broker
TOKEN = "test-token"
# every offloaded input collected with the teacher's answer: the evidence the gateway judges a bundle on before
# it promotes one (tests/gateway/test_rollout_evidence.py)
EVIDENCE = CollectionPolicy.parse("all", rate=1.0)


def _call(method: str, url: str, body: bytes | dict | None = None):
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{method} {url}: {e.code} {e.read()[:500]!r}") from e


def _zero_model(student_onnx: Path, n_out: int = 10) -> bytes:
    """A model with the student's input and output shapes whose logits are all zero: confidence 0.1 everywhere
    (``n_out`` other than 10: a model that fails the agent's smoke test, one logit per label)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(student_onnx))
    inp = m.graph.input[0]
    out_name = m.graph.output[0].name
    w = numpy_helper.from_array(np.zeros((64, n_out), np.float32), "w")
    g = helper.make_graph([helper.make_node("Flatten", [inp.name], ["f"], axis=1),
                           helper.make_node("MatMul", ["f", "w"], [out_name])], "zero", [inp],
                          [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", n_out])], [w])
    return helper.make_model(g, opset_imports=m.opset_import, ir_version=m.ir_version).SerializeToString()


class Fleet:
    """Agents fed continuously (telemetry every 0.2 s) until stopped."""

    def __init__(self, broker, run, tmp, gateway_url: str, ids=("dev-a", "dev-b", "dev-c"), bundles=None):
        bundles = bundles or {}
        self.agents = {d: make_agent(broker, bundles.get(d, run.bundle_dir), d, tmp,
                                     update_bases=(f"{gateway_url}/api/bundles",), deadline_s=1.0).start()
                       for d in ids}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._feed, args=(a, run), daemon=True) for a in self.agents.values()]
        for t in self.threads:
            t.start()

    def _feed(self, agent, run):
        def source():
            i = 0
            while not self.stop.is_set():
                yield from items(run.x_test[i % 300:i % 300 + 10], run.y_test[i % 300:i % 300 + 10])
                i += 10
                time.sleep(0.02)
        for _ in agent.run(source()):
            pass

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(10)
        for a in self.agents.values():
            a.stop()

    def shas(self):
        return {d: a.bundle.manifest_sha256 for d, a in self.agents.items()}


def _upload(url: str, name: str, tar: Path) -> None:
    _call("PUT", f"{url}/api/bundles/{name}", tar.read_bytes())


def _wait_state(url: str, rid: int, states: set[str], timeout: float = 60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = _call("GET", f"{url}/api/rollouts/{rid}")
        if r["state"] in states:
            return r
        time.sleep(0.2)
    raise AssertionError(f"rollout {rid} never reached {states}: {r['state']} {[s['step'] for s in r['steps']]}")


def test_conditions_parse_evaluate_and_refuse_bad_text():
    c = parse_condition("offload_rate <= baseline * 1.5 and rollbacks == 0 or drift < 1")
    ok, notes = c.evaluate({"offload_rate": 0.3, "rollbacks": 0, "drift": 1}, {"offload_rate": 0.1})
    assert not ok and any("FAILED" in n for n in notes)
    assert c.evaluate({"offload_rate": 0.1, "rollbacks": 0, "drift": 1}, {"offload_rate": 0.1})[0]
    for bad, msg in (("offload <= 1", "unknown metric 'offload'"), ("rollbacks ==", "expected a number"),
                     ("rollbacks == 0 xor drift < 1", "expected 'and' or 'or'"), ("__import__('os')", "cannot read")):
        with pytest.raises(GatewayError, match=msg):
            parse_condition(bad)
    m = aggregate([{"counts": {"inputs": 10, "cloud": 2, "fallback": 1, "rollbacks": 0},
                    "latency": {"edge": {"p99": 0.002}}, "drift": {"flag": True}}])
    assert m == {"inputs": 10, "offload_rate": 0.3, "fallback_rate": 0.1, "rollbacks": 0, "errors": 0, "drift": 1.0,
                 "p99_ms": 2.0}


def test_the_watch_counts_only_windows_that_started_on_the_new_bundle():
    def window(t0, t1, inputs, cloud, flag):
        return {"t_start": t0, "t_end": t1, "counts": {"inputs": inputs, "edge": inputs - cloud, "cloud": cloud},
                "drift": {"n": inputs, "flag": flag}, "latency": {"edge": {"p99": 0.0002}}}

    since = 100.0  # the canaries confirmed on the new bundle
    straddling = window(99.4, 100.4, 66, 60, True)  # mostly the old bundle's inputs and a verdict on a few new ones
    after = [window(100.4, 101.4, 120, 12, False), window(101.4, 102.4, 121, 10, False)]
    m = watch_metrics([straddling, *after], since)
    assert m["inputs"] == 241 and m["drift"] == 0.0 and m["offload_rate"] == pytest.approx(22 / 241)
    assert aggregate([straddling, *after])["drift"] == 1.0  # what the watch read before
    assert watch_metrics([straddling], since) is None  # nothing whole yet: the watch cannot judge


def test_a_good_canary_is_promoted_and_a_bad_one_rolled_back(mosquitto, tiny_cascade, tmp_path):
    run = tiny_cascade
    gw = start_gateway(mosquitto, run, tmp_path / "gw", collect=EVIDENCE)
    gw.rollouts.update_timeout_s = 15
    url = gw.http_url
    fleet = Fleet(mosquitto, run, tmp_path, url)
    try:
        _upload(url, "v1", run.tarball)
        _upload(url, "v2", retag_bundle(run.bundle_dir, tmp_path / "v2", version="v2"))
        _upload(url, "bad", retag_bundle(run.bundle_dir, tmp_path / "bad", version="bad",
                                         model_bytes=_zero_model(run.bundle_dir / "model.onnx")))
        v1 = fleet.shas()["dev-a"]
        wait_for(lambda: all(gw.store.telemetry.history(d, limit=1) for d in fleet.agents), 10, "baseline telemetry")
        time.sleep(1.0)
        rid = _call("POST", f"{url}/api/rollouts", {"bundle": "v2", "canary": ["dev-a"], "watch_s": 3.0,
                                                    "promote_if": "rollbacks == 0 and offload_rate <= baseline + 0.3"})["id"]
        r = _wait_state(url, rid, {"done", "rolled_back"})
        assert r["state"] == "done", r["steps"]
        assert [s["step"] for s in r["steps"]] == ["started", "canaries updated", "condition met",
                                                   "gateway evaluation passed", "promoted to the fleet"]
        v2 = r["plan"]["manifest_sha256"]
        wait_for(lambda: set(fleet.shas().values()) == {v2}, 10, "every device on v2")
        assert set(r["device_versions"].values()) == {v2}

        # a bundle that answers nothing confidently: every input goes to the cloud, the canary is rolled back
        time.sleep(1.0)
        rid = _call("POST", f"{url}/api/rollouts", {"bundle": "bad", "canary": "34%", "watch_s": 3.0,
                                                    "promote_if": "offload_rate <= baseline * 1.5 + 0.05"})["id"]
        r = _wait_state(url, rid, {"done", "rolled_back"})
        assert r["state"] == "rolled_back", r["steps"]
        failed = next(s for s in r["steps"] if s["step"] == "condition failed")
        assert failed["detail"]["metrics"]["offload_rate"] > failed["detail"]["baseline"]["offload_rate"] + 0.3
        wait_for(lambda: set(fleet.shas().values()) == {v2}, 10, "nobody left on the bad bundle")
        assert v1 != v2
    finally:
        fleet.close()
        gw.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(mosquitto, run, tmp: Path, port: int) -> subprocess.Popen:
    user, pw = mosquitto.gateway_credentials
    p = subprocess.Popen([sys.executable, "-m", "cloud_gateway.cli", "serve", "--broker", mosquitto.url, "--username",
                          user, "--password", pw, "--teacher", str(run.teacher_onnx), "--db", str(tmp / "gw.sqlite"),
                          "--bundles-dir", str(tmp / "bundles"), "--http-port", str(port), "--token", TOKEN,
                          "--trust-key", str(release_pub_path()), "--command-key", str(command_key_paths()[0]),
                          "--threads", "1", "--collect", "all",
                          "--collect-rate", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert "serving" in (p.stdout.readline() if p.stdout else "")
    return p


def test_a_gateway_killed_mid_rollout_resumes_it_on_restart(mosquitto, tiny_cascade, tmp_path):
    run = tiny_cascade
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(mosquitto, run, tmp_path, port)
    fleet = Fleet(mosquitto, run, tmp_path, url, ids=("dev-a", "dev-b"))
    try:
        _upload(url, "v1", run.tarball)
        _upload(url, "v2", retag_bundle(run.bundle_dir, tmp_path / "v2", version="v2"))
        wait_for(lambda: _call("GET", f"{url}/api/devices")["total"] == 2, 10, "devices known")
        time.sleep(1.0)
        rid = _call("POST", f"{url}/api/rollouts", {"bundle": "v2", "canary": ["dev-a"], "watch_s": 4,
                                                    "promote_if": "rollbacks == 0"})["id"]
        _wait_state(url, rid, {"watching"}, timeout=30)
        proc.kill()  # SIGKILL in the middle of the watch window
        proc.wait(10)
        proc = _serve(mosquitto, run, tmp_path, port)
        r = _wait_state(url, rid, {"done", "rolled_back"}, timeout=60)
        steps = [s["step"] for s in r["steps"]]
        assert r["state"] == "done" and "resumed" in steps, steps
        v2 = r["plan"]["manifest_sha256"]
        wait_for(lambda: set(fleet.shas().values()) == {v2}, 15, "both devices on v2")
        assert set(r["device_versions"].values()) == {v2}  # every device's version is the recorded one
    finally:
        fleet.close()
        proc.kill()
        proc.wait(10)


# --- model lines: a rollout, the policy and a device's updates stay within the bundle's model line -----------
OTHER = "tiny-other"  # a second model line with the same input shape as tiny-digits: only its name tells them apart


def _status(gw, device: str) -> dict:
    return (gw.store.devices.get(device) or {}).get("status") or {}


def test_two_model_lines_on_one_broker_a_device_refuses_another_lines_bundle(mosquitto, tiny_cascade, tmp_path):
    from tests.agent.tiny import Listener

    run = tiny_cascade
    gw = start_gateway(mosquitto, run, tmp_path / "gw")
    url = gw.http_url
    other_tar = retag_bundle(run.bundle_dir, tmp_path / "other", version="1", name=OTHER)
    fleet = Fleet(mosquitto, run, tmp_path, url, ids=("dev-a", "dev-d"), bundles={"dev-d": tmp_path / "other"})
    admin = Listener(mosquitto, ["fleet/+/status"])
    try:
        _upload(url, "digits-v2", retag_bundle(run.bundle_dir, tmp_path / "v2", version="v2"))
        wait_for(lambda: gw.store.devices.get("dev-d") and gw.store.devices.get("dev-a"), 10, "both devices known")
        assert {d["device_id"]: d["model_line"] for d in _call("GET", f"{url}/api/devices")["devices"]} == {
            "dev-a": "tiny-digits", "dev-d": OTHER}
        before = fleet.agents["dev-d"].bundle.manifest_sha256
        # ordered directly, the line-B device refuses line A's bundle and keeps its own
        _call("POST", f"{url}/api/devices/dev-d/cmd", {"cmd": "update_bundle", "id": "direct",
                                                        "url": f"{url}/api/bundles/digits-v2"})
        wait_for(lambda: (_status(gw, "dev-d").get("last_cmd") or {}).get("id") == "direct", 15, "dev-d's answer")
        last = _status(gw, "dev-d")["last_cmd"]
        assert last["ok"] is False
        assert last["error"] == f"bundle digits-v2 is model line tiny-digits, this device runs {OTHER}; refused"
        assert fleet.agents["dev-d"].bundle.manifest_sha256 == before and _status(gw, "dev-d")["model"] == OTHER
        # told explicitly, it switches lines
        _call("POST", f"{url}/api/devices/dev-d/cmd", {"cmd": "update_bundle", "id": "switch", "allow_line_change": True,
                                                        "url": f"{url}/api/bundles/digits-v2"})
        wait_for(lambda: (_status(gw, "dev-d").get("last_cmd") or {}).get("id") == "switch", 15, "the switch")
        assert _status(gw, "dev-d")["last_cmd"]["ok"] is True
        assert fleet.agents["dev-d"].bundle.manifest.model.name == "tiny-digits"
        wait_for(lambda: gw.store.devices.get("dev-d")["model_line"] == "tiny-digits", 10, "the new line stored")
        assert other_tar.is_file()
    finally:
        admin.stop()
        fleet.close()
        gw.stop()


def test_a_rollout_reaches_only_its_model_line_and_a_refusing_canary_fails_it(mosquitto, tiny_cascade, tmp_path):
    run = tiny_cascade
    gw = start_gateway(mosquitto, run, tmp_path / "gw", collect=EVIDENCE)
    gw.rollouts.update_timeout_s = 20
    url = gw.http_url
    other_tar = retag_bundle(run.bundle_dir, tmp_path / "other", version="1", name=OTHER)
    fleet = Fleet(mosquitto, run, tmp_path, url, ids=("dev-a", "dev-b", "dev-d"),
                  bundles={"dev-d": tmp_path / "other"})
    try:
        _upload(url, "v1", run.tarball)
        _upload(url, "other-v1", other_tar)
        _upload(url, "v2", retag_bundle(run.bundle_dir, tmp_path / "v2", version="v2"))
        _upload(url, "broken", retag_bundle(run.bundle_dir, tmp_path / "broken", version="broken",
                                            model_bytes=_zero_model(run.bundle_dir / "model.onnx", n_out=5)))
        x_sha = fleet.shas()["dev-d"]
        wait_for(lambda: all(gw.store.telemetry.history(d, limit=1) for d in fleet.agents), 10, "telemetry")
        # a line-B canary for a line-A bundle is refused up front, naming why
        with pytest.raises(AssertionError, match=r"dev-d \(model line tiny-other\)"):
            _call("POST", f"{url}/api/rollouts", {"bundle": "v2", "canary": ["dev-d"], "watch_s": 3.0})
        rid = _call("POST", f"{url}/api/rollouts", {"bundle": "v2", "canary": ["dev-a"], "watch_s": 3.0,
                                                    "promote_if": "rollbacks == 0"})["id"]
        r = _wait_state(url, rid, {"done", "rolled_back", "failed"})
        assert r["state"] == "done", r["steps"]
        assert r["plan"]["line"] == "tiny-digits" and r["plan"]["rest"] == ["dev-b"]
        assert r["plan"]["excluded"] == {f"model line {OTHER}": ["dev-d"]}
        assert r["steps"][0]["detail"]["excluded"] == {f"model line {OTHER}": 1}
        v2 = r["plan"]["manifest_sha256"]
        wait_for(lambda: fleet.shas()["dev-b"] == v2, 10, "dev-b on v2")
        time.sleep(0.5)
        assert fleet.shas()["dev-d"] == x_sha and r["device_versions"]["dev-d"] == x_sha  # never touched

        # a canary that cannot load the bundle (its smoke test: 5 logits for 10 labels): failed, never done
        rid = _call("POST", f"{url}/api/rollouts", {"bundle": "broken", "canary": ["dev-a"], "watch_s": 3.0,
                                                    "promote_if": "rollbacks == 0"})["id"]
        r = _wait_state(url, rid, {"done", "rolled_back", "failed"}, timeout=30)
        assert r["state"] == "failed", r["steps"]
        assert list(r["result"]["refused"]) == ["dev-a"] and "smoke input" in r["result"]["refused"]["dev-a"]
        assert r["steps"][-1]["detail"]["refused"] == r["result"]["refused"]
        assert "promoted to the fleet" not in [s["step"] for s in r["steps"]]
        assert set(fleet.shas().values()) == {v2, x_sha}

        # --line: the explicit, logged move of line B to line A's bundle (the commands say so; devices accept)
        rid = _call("POST", f"{url}/api/rollouts", {"bundle": "v2", "canary": ["dev-d"], "watch_s": 3.0,
                                                    "promote_if": "rollbacks == 0", "line": OTHER})["id"]
        r = _wait_state(url, rid, {"done", "rolled_back", "failed"})
        assert r["state"] == "done", r["steps"]
        assert r["plan"]["line_change"] == {"from": OTHER, "to": "tiny-digits"}
        assert r["steps"][1]["step"] == "line change" and r["steps"][1]["detail"]["devices"] == ["dev-d"]
        wait_for(lambda: fleet.shas()["dev-d"] == v2, 10, "dev-d moved to line A")
    finally:
        fleet.close()
        gw.stop()


def _promotion(tmp_path, n: int, *, ignore: frozenset[str] = frozenset()):  # type: ignore[no-untyped-def]
    """A rollout in ``promoting`` over ``n`` devices of one line (every fourth offline); the devices apply a command
    at once, except those in ``ignore``. Returns (the store, the rollout, the devices sent to, the device queries)."""
    from cloud_gateway.rollout import RolloutManager
    from cloud_gateway.store import GatewayStore

    store = GatewayStore(tmp_path / "g.sqlite")
    sha, old = "ab" * 32, "00" * 32
    ids = [f"d{i:03d}" for i in range(n)]
    store.devices.set_statuses([(d, {"state": "offline" if i % 4 == 0 else "online", "model": "digits",
                                     "bundle_sha256": old}) for i, d in enumerate(ids)])
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    (bundles / "v2.tar.gz").write_bytes(b"v2")
    sent: list[str] = []

    def send_command(d: str, cmd: dict) -> None:
        sent.append(d)
        if d not in ignore:
            store.devices.set_statuses([(d, {"state": "online", "model": "digits", "bundle_sha256": sha})])

    queries = {"versions": 0, "get": 0}
    for name in queries:
        real = getattr(store.devices, name)
        setattr(store.devices, name, lambda *a, _r=real, _n=name, **k: (queries.__setitem__(_n, queries[_n] + 1),
                                                                       _r(*a, **k))[1])
    mgr = RolloutManager(store=store, bundles_dir=bundles, send_command=send_command, base_url=lambda: "http://gw",
                         update_timeout_s=1.0, poll_s=0.1)
    rid = store.rollouts.create("v2", {"canaries": [], "rest": ids, "watch_s": 1, "promote_if": "rollbacks == 0",
                                       "previous": {}, "manifest_sha256": sha}, None)
    mgr._promoting(rid, store.rollouts.get(rid))
    return store, store.rollouts.get(rid), sent, queries, ids


def test_promotion_updates_the_online_devices_lists_the_offline_ones_in_few_queries(tmp_path):
    store, r, sent, queries, ids = _promotion(tmp_path, 400)
    offline = [d for i, d in enumerate(ids) if i % 4 == 0]
    assert r["state"] == "done" and sorted(sent) == sorted(set(ids) - set(offline))  # nothing sent to the offline
    step = r["steps"][-1]
    assert step["detail"]["offline"] == offline and step["detail"]["not_updated"] == []
    assert "100 offline" in step["step"]
    assert queries["get"] == 0 and queries["versions"] <= 6, queries  # per tick one query, not one per device


def test_promotion_is_never_done_while_an_online_device_is_not_updated(tmp_path):
    store, r, sent, queries, ids = _promotion(tmp_path, 40, ignore=frozenset({"d013"}))
    assert r["state"] == "failed" and r["steps"][-1]["detail"]["not_updated"] == ["d013"]
    assert "d013" in r["result"]["refused"]
