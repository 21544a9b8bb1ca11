"""A fleet benchmark through a real Mosquitto: two real device agents on loopback.

The agents (device_agent.Agent, with the broker's per-device passwords and ACL)
receive the bench job on fleet/<id>/cmd, run hw_bench.job.run_job on the
digits bundle and answer on fleet/<id>/bench; a third device is never started
and must be reported as not answering.
"""

from __future__ import annotations

import functools
import http.server
import json
import threading
import time
from pathlib import Path

import pytest

from hw_bench.cli import main
from hw_bench.data import TestData, save_npz
from hw_bench.results import read_run

pytestmark = pytest.mark.broker


def _wait_online(broker, ids: list[str], timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Agents publish their retained status after subscribing to their cmd topic."""
    import paho.mqtt.client as mqtt

    seen: set[str] = set()
    ev = threading.Event()

    def on_message(c, u, m):  # type: ignore[no-untyped-def]
        try:
            body = json.loads(m.payload)
        except ValueError:
            return
        if body.get("state", "online") != "offline":
            seen.add(m.topic.split("/")[1])
        if seen >= set(ids):
            ev.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-wait")
    c.username_pw_set(*broker.admin_credentials)
    c.on_connect = lambda c, u, f, rc, p: c.subscribe("fleet/+/status", qos=1)
    c.on_message = on_message
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        assert ev.wait(timeout), f"agents not online: {set(ids) - seen}"
    finally:
        c.loop_stop()
        c.disconnect()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):  # type: ignore[no-untyped-def]
        pass


def test_fleet_bench_two_agents_and_a_silent_device(mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.agent.tiny import bench_commands, build_tiny, command_key_paths, make_agent

    run = build_tiny(tmp_path / "tiny")
    www = tmp_path / "www"
    www.mkdir()
    save_npz(www / "test.npz", TestData(run.x_test, run.y_test, "digits-test"))
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}/"  # the devices' update allow-list serves the test data
    agents = [make_agent(mosquitto, run.bundle_dir, d, tmp_path, commands=bench_commands(), update_bases=(base,)).start()
              for d in ("dev-a", "dev-b")]
    try:
        _wait_online(mosquitto, ["dev-a", "dev-b"])
        user, pw = mosquitto.admin_credentials
        t0 = time.monotonic()
        rc = main(["fleet", "--broker", mosquitto.url, "--username", user, "--password", pw,
                   "--devices", "dev-a,dev-b,dev-c", "--bundle", str(run.bundle_dir), "--deadline", "8",
                   "--duration", "0.2", "--min-queries", "20", "--warmup", "2", "--threads", "1",
                   "--data", base + "test.npz", "--out", str(tmp_path / "fleet"),
                   "--command-key", str(command_key_paths()[0])])
        elapsed = time.monotonic() - t0
    finally:
        for a in agents:
            a.stop()
        httpd.shutdown()
        httpd.server_close()
    assert rc == 0
    doc = read_run(tmp_path / "fleet" / "fleet_results.json")
    status = {d["device_id"]: d for d in doc["devices"]}
    assert status["dev-a"]["ok"] and status["dev-b"]["ok"]
    assert not status["dev-c"]["ok"] and status["dev-c"]["status"] == "timeout"
    assert elapsed >= 8  # waited the deadline for dev-c
    rows = {r["device_id"]: r for r in doc["results"]}
    assert set(rows) == {"dev-a", "dev-b"}
    for r in rows.values():
        assert r["queries"] >= 20 and r["threads"] == 1 and r["target"] == "onnx"
        # the digits student's accuracy, measured on the device from the job's data
        pred = r["accuracy"]["accuracy"]
        assert 0.8 < pred <= 1.0 and r["accuracy"]["n"] == len(run.y_test)
        assert r["env"]["cpu"]["logical_cores"] >= 1
    md = (tmp_path / "fleet" / "report.md").read_text()
    assert "dev-c | no answer" in md and "dev-a" in md
    assert (tmp_path / "fleet" / "latency.png").exists()


def test_fleet_refuses_bad_credentials(mosquitto, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rc = main(["fleet", "--broker", mosquitto.url, "--username", "admin", "--password", "wrong",
               "--devices", "dev-a", "--deadline", "1", "--out", str(tmp_path / "f")])
    assert rc == 2
    assert "refused the login: Not authorized (check the username and password" in capsys.readouterr().err
    assert not (tmp_path / "f" / "fleet_results.json").exists()
