"""Gateway behaviour through a real Mosquitto: replicas, bad input, ACL, outage, API, updates."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agent.agent import Route, summarize
from device_agent.sources import Item
from edgecore import wire
from edgecore.bundle import sha256_file
from tests.agent.tiny import (
    Listener,
    bench_commands,
    items,
    make_agent,
    retag_bundle,
    start_gateway,
)
from tests.agent.tiny import wait_for as _wait

pytestmark = pytest.mark.broker


def _client(broker, creds, client_id):
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.username_pw_set(*creds)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def _reply_client(broker, device: str, client_id: str):
    """A raw MQTT client of ``device`` subscribed to its reply topic; replies land in the dict, by correlation."""
    replies: dict[bytes, dict] = {}
    c = _client(broker, broker.credentials(device), client_id)
    c.on_message = lambda cl, u, m: replies.__setitem__(
        bytes.fromhex(wire.loads(m.payload)["correlation"]), wire.loads(m.payload))
    c.subscribe(f"fleet/{device}/infer/resp", qos=1)
    time.sleep(0.3)
    return c, replies


def _req_props(resp: str | None, corr: bytes):
    p = Properties(PacketTypes.PUBLISH)
    if resp:
        p.ResponseTopic = resp
    p.CorrelationData = corr
    return p


def test_two_replicas_share_the_requests(mosquitto, tiny_cascade, tmp_path):
    run = tiny_cascade
    with start_gateway(mosquitto, run, tmp_path / "g0", replica="gw-0", http=False, batch_ms=2) as g0, \
            start_gateway(mosquitto, run, tmp_path / "g1", replica="gw-1", http=False, batch_ms=2) as g1:
        with make_agent(mosquitto, run.bundle_dir, "dev-a", tmp_path, threshold=1.01, deadline_s=3.0,
                        batch_size=4) as agent:
            ans = list(agent.run(items(run.x_test[:80], run.y_test[:80])))
    s = summarize(ans)
    assert s["cloud"] == 80, s  # threshold above 1: every input asks the cloud
    assert g0.worker.served > 0 and g1.worker.served > 0
    assert g0.worker.served + g1.worker.served == 80


def test_malformed_requests_get_error_replies_and_the_gateway_keeps_serving(mosquitto, tiny_cascade, tmp_path):
    run = tiny_cascade
    with start_gateway(mosquitto, run, tmp_path, http=False) as gw:
        c, replies = _reply_client(mosquitto, "dev-b", "dev-b-raw")
        resp = "fleet/dev-b/infer/resp"
        good = wire.encode_tensor(run.spec.preprocess(run.x_test[:1]))
        bad = {
            b"random": np.random.default_rng(0).bytes(300),
            b"shape": wire.encode_tensor(np.zeros((1, 3, 8, 8), np.float32)),
            b"dtype": wire.encode_tensor(np.zeros((1, 1, 8, 8), np.int32)),
            b"nan": wire.encode_tensor(np.full((1, 1, 8, 8), np.nan, np.float32)),
            b"huge": wire.encode_tensor(np.zeros((1, 1, 800, 800), np.float32)),  # 2.5 MB
            b"truncated": good[:-10],
            b"finite-but-huge": wire.encode_tensor(np.full((1, 1, 8, 8), 3e38, np.float32)),  # teacher overflows
            b"int64-overflow": wire.encode_tensor(np.zeros((1, 1, 8, 8), np.float32))[:8]
            + struct.pack("<4I", 2**16, 2**16, 2**16, 2**16),
            b"garbage-envelope": b"EV\x01\xff\xff",
        }
        for corr, payload in bad.items():
            c.publish("fleet/dev-b/infer/req", payload, qos=1, properties=_req_props(resp, corr))
        # envelopes (MQTT 3.1.1 style, no properties): unknown version and truncated tensor both answered
        for corr, payload in {b"env-v9": wire.encode_request(good, correlation=b"env-v9", response_topic=resp,
                                                              version=9),
                              b"env-trunc": wire.encode_request(good[:-3], correlation=b"env-trunc",
                                                                response_topic=resp)}.items():
            bad[corr] = payload
            c.publish("fleet/dev-b/infer/req", payload, qos=1)
        # no response topic, and a response topic of another device: counted, never answered
        c.publish("fleet/dev-b/infer/req", good, qos=1, properties=_req_props(None, b"noresp"))
        c.publish("fleet/dev-b/infer/req", good, qos=1, properties=_req_props("fleet/dev-c/infer/resp", b"other"))
        c.publish("fleet/dev-b/infer/req", good, qos=1, properties=_req_props(resp, b"good"))
        _wait(lambda: len(replies) >= len(bad) + 1, 10, "replies")
        time.sleep(0.3)
        c.disconnect()
        c.loop_stop()
        for corr in bad:
            assert replies[corr]["ok"] is False and replies[corr]["error"], corr
        assert "exceeds" in replies[b"huge"]["error"] and "shape" in replies[b"shape"]["error"]
        assert "not finite" in replies[b"finite-but-huge"]["error"]
        assert "too large" in replies[b"int64-overflow"]["error"]
        assert "unknown request envelope version 9" in replies[b"env-v9"]["error"]
        assert "tensor body" in replies[b"env-trunc"]["error"]
        assert replies[b"good"]["ok"] is True and replies[b"good"]["prediction"] in range(10)
        assert b"noresp" not in replies and b"other" not in replies
        assert gw.metrics.value("gateway_invalid_requests_total", device="dev-b") == len(bad) + 2 - 1  # huge: valid
        assert gw.metrics.value("gateway_nonfinite_outputs_total") == 1
        # and a well-behaved agent is still served afterwards
        with make_agent(mosquitto, run.bundle_dir, "dev-a", tmp_path, threshold=1.01, deadline_s=2) as agent:
            assert summarize(list(agent.run(items(run.x_test[:10]))))["cloud"] == 10


def test_acl_device_cannot_act_as_another(mosquitto, tiny_cascade, tmp_path):
    watch = Listener(mosquitto, ["fleet/#"])
    a = Listener(mosquitto, ["fleet/dev-b/#"], client_id="dev-a-snoop", creds=mosquitto.credentials("dev-a"))
    c = _client(mosquitto, mosquitto.credentials("dev-a"), "dev-a-evil")
    c.publish("fleet/dev-b/telemetry", wire.dumps({"device_id": "dev-b", "seq": 0}), qos=1).wait_for_publish(5)
    c.publish("fleet/dev-b/infer/req", b"x", qos=1, properties=_req_props("fleet/dev-b/infer/resp", b"1")
              ).wait_for_publish(5)
    # nor order itself a bundle: a device never writes its own command topic (only the gateway does)
    c.publish("fleet/dev-a/cmd", wire.dumps({"cmd": "update_bundle", "url": "http://evil/old"}), qos=1
              ).wait_for_publish(5)
    c.publish("fleet/dev-a/telemetry", b"own", qos=1).wait_for_publish(5)  # control: its own topic works
    _wait(lambda: any(t == "fleet/dev-a/telemetry" for t, _ in watch.messages), 5, "own message")
    time.sleep(0.3)
    assert not [t for t, _ in watch.messages if t.startswith("fleet/dev-b/") or t == "fleet/dev-a/cmd"]
    # nor read B's traffic: a real message from B reaches the operator, never A's snooping client
    b = _client(mosquitto, mosquitto.credentials("dev-b"), "dev-b")
    b.publish("fleet/dev-b/telemetry", b"from-b", qos=1).wait_for_publish(5)
    _wait(lambda: any(p == b"from-b" for _, p in watch.messages), 5, "B's own message")
    time.sleep(0.3)
    assert a.messages == []
    b.disconnect()
    b.loop_stop()
    bad = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="x", protocol=mqtt.MQTTv5)
    bad.username_pw_set("dev-a", "wrong")
    with pytest.raises(Exception):  # noqa: B017 (paho raises its own types, or OSError, depending on when the broker hangs up)
        bad.connect(mosquitto.host, mosquitto.port)
        rc = bad.loop(timeout=2) or bad.loop(timeout=2)
        if not bad.is_connected():
            raise ConnectionRefusedError(rc)
    for x in (c,):
        x.disconnect()
        x.loop_stop()
    watch.stop()
    a.stop()


def _spawn_gateway(mosquitto, run, tmp_path, replica="gw-k"):
    user, pw = mosquitto.gateway_credentials
    cmd = [sys.executable, "-m", "cloud_gateway.cli", "serve", "--broker", mosquitto.url, "--teacher",
           str(run.teacher_onnx), "--username", user, "--password", pw, "--replica-id", replica,
           "--db", str(tmp_path / "gw.sqlite"), "--http-port", "-1"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    assert "serving" in line, line
    return p


def test_gateway_killed_mid_stream_everything_answered_then_offload_resumes(mosquitto, tiny_cascade, tmp_path):
    run = tiny_cascade
    gw = _spawn_gateway(mosquitto, run, tmp_path)

    def source():
        nonlocal gw
        for i in range(150):
            if i == 50:  # mid-stream: the gateway dies without a goodbye
                gw.send_signal(signal.SIGKILL)
                gw.wait()
            if i == 100:  # back: wait until it is serving again
                gw = _spawn_gateway(mosquitto, run, tmp_path)
            yield Item(str(i), run.x_test[i], int(run.y_test[i]))

    try:
        with make_agent(mosquitto, run.bundle_dir, "dev-a", tmp_path, threshold=1.01, deadline_s=0.3,
                        batch_size=5) as agent:
            ans = list(agent.run(source()))
    finally:
        gw.send_signal(signal.SIGTERM)
        gw.wait(10)
    assert len(ans) == 150 and len({a.id for a in ans}) == 150  # every input answered, once
    routes = [a.route for a in ans]
    assert routes[:45].count(Route.CLOUD) == 45
    assert routes[55:95].count(Route.FALLBACK) == 40
    assert all(a.reason == "timeout" for a in ans if a.route is Route.FALLBACK)
    assert routes[120:].count(Route.CLOUD) == 30, [(a.route.value, a.reason) for a in ans[95:]]  # offloading resumed (the first batches may still warm up)
    assert agent.counts["fallback"] == routes.count(Route.FALLBACK)
    acc = summarize(ans)["accuracy"]
    assert acc > 0.9  # fallbacks are the device's own (good) predictions


def _http(method, url, data=None, token=None):
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None and method == "POST" and url.endswith("/cmd"):
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_api_bundle_update_rollback_and_bench_over_mqtt(mosquitto, tiny_cascade, tmp_path):
    run = tiny_cascade
    v2 = retag_bundle(run.bundle_dir, tmp_path / "v2", version="2")
    broken = retag_bundle(run.bundle_dir, tmp_path / "broken", version="3", model_bytes=b"not an onnx model")
    watch = Listener(mosquitto, ["fleet/dev-a/status", "fleet/dev-a/bench"])
    with start_gateway(mosquitto, run, tmp_path) as gw:
        url = gw.http_url
        assert _http("GET", f"{url}/healthz")[0] == 200
        assert _http("PUT", f"{url}/api/bundles/v2", v2.read_bytes())[0] == 401  # token needed
        assert _http("PUT", f"{url}/api/bundles/junk", b"garbage", token="test-token")[0] == 400
        code, body = _http("PUT", f"{url}/api/bundles/v2", v2.read_bytes(), token="test-token")
        assert code == 201, body
        info = json.loads(body)
        assert info["sha256"] == sha256_file(v2)
        assert _http("PUT", f"{url}/api/bundles/broken", broken.read_bytes(), token="test-token")[0] == 201
        assert _http("GET", f"{url}/api/bundles/v2")[1] == v2.read_bytes()

        with make_agent(mosquitto, run.bundle_dir, "dev-a", tmp_path, deadline_s=2.0, update_bases=(f"{url}/api/bundles",),
                        commands=bench_commands()) as agent:
            old = agent.bundle.manifest_sha256
            list(agent.run(items(run.x_test[:40], run.y_test[:40])))

            sent = iter(range(1, 1000))

            def cmd(body):
                # matched by id: an update publishes the new bundle's status before its own outcome, and that
                # status still carries the previous command's (another update_bundle: the name alone races)
                body = {**body, "id": f"t-{next(sent)}"}
                n = len(watch.messages)
                code, _ = _http("POST", f"{url}/api/devices/dev-a/cmd", json.dumps(body).encode(), token="test-token")
                assert code == 200

                def outcome():
                    return [st for t, p in watch.messages[n:] if t.endswith("status")
                            for st in [json.loads(p)] if (st.get("last_cmd") or {}).get("id") == body["id"]]

                _wait(lambda: bool(outcome()), 20, body["cmd"])
                (st,) = outcome()[:1]
                assert st["last_cmd"]["cmd"] == body["cmd"]
                return st

            st = cmd({"cmd": "update_bundle", "url": info["url"], "sha256": "0" * 64})
            assert not st["last_cmd"]["ok"] and "expected" in st["last_cmd"]["error"]
            assert agent.bundle.manifest_sha256 == old  # wrong hash: refused, nothing changed
            st = cmd({"cmd": "update_bundle", "url": f"{url}/api/bundles/broken"})
            assert not st["last_cmd"]["ok"] and agent.bundle.manifest_sha256 == old  # fails to load: kept old
            st = cmd({"cmd": "update_bundle", "url": info["url"], "sha256": info["sha256"]})
            assert st["last_cmd"]["ok"] and st["version"] == "2"
            assert agent.bundle.manifest_sha256 == info["manifest_sha256"] != old
            st = cmd({"cmd": "set_threshold", "threshold": 0.5})
            assert st["threshold"] == 0.5 and agent.threshold == 0.5
            assert summarize(list(agent.run(items(run.x_test[:20]))))["inputs"] == 20
            n = len(watch.messages)
            cmd({"cmd": "bench", "job_id": "j1", "bundle_url": None, "bundle_path": None, "scenario": "single-stream",
                 "duration_s": 0.2, "min_queries": 20, "warmup": 2, "threads": 1, "accuracy": False})
            bench = [json.loads(p) for t, p in watch.messages[n:] if t.endswith("/bench")]
            assert bench and bench[0]["job_id"] == "j1" and bench[0]["device_id"] == "dev-a"
            assert bench[0]["ok"], bench[0]
            assert bench[0]["result"]["results"]

        _wait(lambda: (gw.store.devices.get("dev-a") or {}).get("last_telemetry"), 5, "telemetry")
        _wait(lambda: gw.store.devices.get("dev-a")["state"] == "offline", 5, "the goodbye status")
        devs = json.loads(_http("GET", f"{url}/api/devices")[1])["devices"]
        assert [d["device_id"] for d in devs] == ["dev-a"]
        one = json.loads(_http("GET", f"{url}/api/devices/dev-a")[1])
        assert one["history"] and one["history"][-1]["latency"]["edge"]["count"] >= 0
        assert one["state"] == "offline"  # the agent said goodbye on stop
        assert _http("GET", f"{url}/api/devices/nope")[0] == 404
        prom = _http("GET", f"{url}/metrics")[1].decode()
        for name in ("gateway_requests_total", "gateway_batch_size_bucket", "gateway_request_seconds_bucket",
                     "gateway_ingest_batch_size_bucket", "gateway_telemetry_windows_total"):
            assert name in prom, name
    watch.stop()


def test_fleet_credentials_cli(tmp_path):
    out = tmp_path / "creds"
    r = subprocess.run([sys.executable, "-m", "cloud_gateway.cli", "fleet-credentials", "cam-1", "cam-2",
                        "--out", str(out), "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    creds = json.loads((out / "credentials.json").read_text())
    assert set(creds["devices"]) == {"cam-1", "cam-2"}
    users = dict(line.split(":", 1) for line in (out / "passwd").read_text().splitlines())
    assert set(users) == {"cam-1", "cam-2", "gateway", "admin"} and all(h.startswith("$7$") for h in users.values())
    assert "pattern read fleet/%u/cmd" in (out / "acl").read_text()
    assert oct((out / "credentials.json").stat().st_mode)[-3:] == "600"
    r = subprocess.run([sys.executable, "-m", "cloud_gateway.cli", "fleet-credentials", "bad/id", "--out", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "invalid device id" in r.stderr


def test_generated_fleet_files_work_in_mosquitto(tmp_path):
    """The files `fleet-credentials` writes (random passwords) are accepted by a real Mosquitto."""
    from cloud_gateway.broker import MosquittoBroker, find_mosquitto
    from cloud_gateway.credentials import make_fleet

    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    creds = make_fleet(device_ids=["cam-1"])
    b = MosquittoBroker(tmp_path / "b", creds)
    assert (tmp_path / "b" / "credentials.json").exists()  # written by write_fleet_files
    b.start()
    try:
        c = _client(b, ("cam-1", creds.devices["cam-1"]), "cam-1")
        _wait(c.is_connected, 5, "cam-1 connected with generated credentials")
        c.disconnect()
        c.loop_stop()
    finally:
        b.stop()


def test_mqtt_311_mode_carries_request_metadata_in_an_envelope(mosquitto, tiny_cascade, tmp_path):
    """For brokers without MQTT 5 (e.g. amqtt): same routing, correlation/response topic in the payload."""
    run = tiny_cascade
    assert wire.decode_request(wire.encode_request(b"T", correlation=b"c", response_topic="r")) == (b"c", "r", b"T")
    with pytest.raises(wire.WireError):
        wire.decode_request(wire.encode_request(b"", correlation=b"abc", response_topic="topic")[:7])
    with start_gateway(mosquitto, run, tmp_path, http=False, mqtt_version="3.1.1") as gw:
        with make_agent(mosquitto, run.bundle_dir, "dev-a", tmp_path, threshold=1.01, deadline_s=2.0,
                        mqtt_version="3.1.1") as agent:
            assert not agent.fleet.link.v5
            s = summarize(list(agent.run(items(run.x_test[:30], run.y_test[:30]))))
        _wait(lambda: len(gw.store.telemetry.arrival_order("dev-a")) >= 1, 5, "telemetry over 3.1.1")
    assert s["cloud"] == 30 and s["accuracy"] > 0.9


def test_bad_telemetry_windows_are_refused_counted_and_not_stored(mosquitto, tiny_cascade, tmp_path):
    from tests.gateway.test_fuzz import good_window

    with start_gateway(mosquitto, tiny_cascade, tmp_path) as gw:
        c = _client(mosquitto, mosquitto.credentials("dev-b"), "dev-b-raw")
        bad = [{**good_window("dev-b", 1), "offload_rate": "lots"},
               {**good_window("dev-b", 2), "latency": {"edge": {"count": 1, "p50": "fast"}}},
               {**good_window("dev-b", 3), "seq": "4"},
               {**good_window("dev-b", 5), "drift": {"flag": "yes"}}]
        for w in bad:
            c.publish("fleet/dev-b/telemetry", json.dumps(w).encode(), qos=1).wait_for_publish(5)
        c.publish("fleet/dev-b/telemetry", b"\xff garbage", qos=1).wait_for_publish(5)
        c.publish("fleet/dev-b/telemetry", json.dumps(good_window("dev-b", 9)).encode(), qos=1).wait_for_publish(5)
        _wait(lambda: gw.store.telemetry.arrival_order("dev-b"), 5, "the good window")
        time.sleep(0.2)
        c.disconnect()
        c.loop_stop()
        assert gw.store.telemetry.arrival_order("dev-b") == [9]
        assert gw.metrics.value("gateway_invalid_telemetry_total", device="dev-b") == len(bad) + 1
        code, body = _http("GET", f"{gw.http_url}/api/devices/dev-b")
        assert code == 200 and json.loads(body)["offload_rate"] == 0.2


def _stream_with_a_replica_leaving(mosquitto, run, tmp_path, leave, n=120, at=40):
    """Two replicas; ``leave(g1)`` mid-stream; returns (answers, index from which the replica was gone)."""
    with start_gateway(mosquitto, run, tmp_path / "g0", replica="gw-0", http=False, batch_ms=1) as g0:
        g1 = start_gateway(mosquitto, run, tmp_path / "g1", replica="gw-1", http=False, batch_ms=1)
        served_before = {}

        def source():
            for i in range(n):
                if i == at:
                    served_before.update(g0=g0.worker.served, g1=g1.worker.served)
                    leave(g1)
                yield Item(str(i), run.x_test[i], int(run.y_test[i]))

        try:
            with make_agent(mosquitto, run.bundle_dir, "dev-a", tmp_path, threshold=1.01, deadline_s=1.0,
                            batch_size=2) as agent:
                ans = list(agent.run(source()))
        finally:
            g1.stop()
    assert served_before["g0"] > 0 and served_before["g1"] > 0, served_before  # both were in the group
    return ans


def test_a_stopped_replica_leaves_the_shared_group(mosquitto, tiny_cascade, tmp_path):
    ans = _stream_with_a_replica_leaving(mosquitto, tiny_cascade, tmp_path, lambda g: g.stop())
    after = [a.route for a in ans[40:]]
    assert len(ans) == 120 and after.count(Route.FALLBACK) == 0 and after.count(Route.CLOUD) == 80


def test_a_crashed_replica_leaves_the_shared_group(mosquitto, tiny_cascade, tmp_path):
    def crash(g):  # what kill -9 does to the connection: gone without DISCONNECT, no unsubscribe, no drain
        g.worker._stop.set()
        for c in (g.worker.client, g.worker.ingest_link.client):
            c.loop_stop()
            c.socket().close()

    ans = _stream_with_a_replica_leaving(mosquitto, tiny_cascade, tmp_path, crash)
    after = [a.route for a in ans[40:]]
    # at most one batch of 2 is lost: the one in flight at the crash, or (shared subscriptions alternate) the
    # next one the broker routes to the dead member before it has read the closed socket; none after those two
    assert after.count(Route.FALLBACK) <= 2 and after[4:].count(Route.FALLBACK) == 0, after


def test_upload_requires_a_trusted_signature(mosquitto, tiny_cascade, tmp_path):
    """The gateway serves bundles to the fleet: it refuses unsigned, untrusted and edited-after-signing ones."""
    import tarfile

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgecore.signing import sign

    def tar_of(d):
        t = d.parent / f"{d.name}.tar.gz"
        with tarfile.open(t, "w:gz") as tf:
            tf.add(d, arcname=d.name)
        return t

    good = retag_bundle(tiny_cascade.bundle_dir, tmp_path / "good", version="7")
    unsigned = tmp_path / "unsigned"
    retag_bundle(tiny_cascade.bundle_dir, unsigned, version="8")
    (unsigned / "manifest.sig").unlink()
    stranger = tmp_path / "stranger"
    retag_bundle(tiny_cascade.bundle_dir, stranger, version="9")
    (stranger / "manifest.sig").write_bytes(sign((stranger / "manifest.json").read_bytes(),
                                                 Ed25519PrivateKey.generate()))
    edited = tmp_path / "edited"
    retag_bundle(tiny_cascade.bundle_dir, edited, version="10")
    m = json.loads((edited / "manifest.json").read_text())
    m["routing"]["threshold"] = 0.0  # an attacker turns offloading off, keeping the old signature
    (edited / "manifest.json").write_text(json.dumps(m))
    with start_gateway(mosquitto, tiny_cascade, tmp_path) as gw:
        def put(name: str, t: Path) -> tuple:
            return _http("PUT", f"{gw.http_url}/api/bundles/{name}", t.read_bytes(), token="test-token")

        assert put("good", good)[0] == 201
        for name, d, why in (("unsigned", unsigned, "not signed"), ("stranger", stranger, "none of which"),
                             ("edited", edited, "does not match the manifest")):
            code, body = put(name, tar_of(d))
            assert code == 400 and why in json.loads(body)["error"], body
        listed = json.loads(_http("GET", f"{gw.http_url}/api/bundles")[1])
        assert [b["name"] for b in listed] == ["good"]


def test_a_burst_of_requests_is_answered_in_batches_and_none_is_stranded(mosquitto, tiny_cascade, tmp_path):
    """Requests that arrive together are served in few model calls (held on the network thread while more wait
    on the socket); every one of them is answered, including the last of the burst."""
    run = tiny_cascade
    with start_gateway(mosquitto, run, tmp_path, http=False) as gw:
        c, replies = _reply_client(mosquitto, "dev-b", "dev-b-burst")
        x = run.spec.preprocess(run.x_test[:60])
        want = np.asarray(gw.teacher.run(x)).argmax(1)
        for rnd in range(3):  # bursts of 20, a pause between them
            for i in range(rnd * 20, rnd * 20 + 20):
                c.publish("fleet/dev-b/infer/req", wire.encode_tensor(x[i : i + 1]), qos=1,
                          properties=_req_props("fleet/dev-b/infer/resp", b"%03d" % i))
            _wait(lambda n=rnd * 20 + 20: len(replies) >= n, 10, f"burst {rnd}")
        c.disconnect()
        c.loop_stop()
        assert sorted(replies) == [b"%03d" % i for i in range(60)]
        assert all(r["ok"] for r in replies.values())
        assert [replies[b"%03d" % i]["prediction"] for i in range(60)] == want.tolist()  # batching keeps the order
        assert max(r["batch_size"] for r in replies.values()) > 1  # some arrived together and were batched
        calls = gw.worker.metrics.hist_count("gateway_batch_size")
        assert calls < 60 and gw.worker.served == 60
