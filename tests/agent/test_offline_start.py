"""The agent starts while the broker is down: it answers locally, keeps telemetry in its outbox and joins the
broker when it appears (a refused login still stops it: tests/agent/test_cli.py)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from device_agent.agent import Route
from tests.agent.tiny import items, make_agent, release_pub_path, start_gateway, wait_for

pytestmark = pytest.mark.broker


def test_agent_started_without_a_broker_answers_locally_and_flushes_its_outbox_when_one_appears(
        mosquitto, tiny_cascade, tmp_path):
    run = tiny_cascade
    # the gateway's ingest session is persistent: telemetry the agent sends before the gateway is back is
    # queued for it by the broker, so every window can be counted in its store
    gw = start_gateway(mosquitto, run, tmp_path, http=False)
    mosquitto.stop()  # nobody listens on the broker's port now
    agent = make_agent(mosquitto, run.bundle_dir, "dev-a", tmp_path, threshold=1.01, telemetry_window_s=3600)
    try:
        t0 = time.monotonic()
        agent.start()
        assert time.monotonic() - t0 < 5, "start waited for the missing broker"
        assert agent.fleet.status()["broker"].startswith("connecting"), agent.fleet.status()["broker"]
        answers = list(agent.run(items(run.x_test[:20], run.y_test[:20])))
        assert len(answers) == 20  # answered locally: every uncertain input falls back, reason broker
        assert {(a.route, a.reason) for a in answers} == {(Route.FALLBACK, "broker")}
        agent.fleet.flush_window()
        assert len(agent.fleet.outbox) == 1 and not agent.fleet.link.connected.is_set()  # queued, not lost

        mosquitto.start()
        wait_for(lambda: agent.fleet.link.ready.is_set(), 15, "the agent to connect to the broker that appeared")
        wait_for(lambda: len(agent.fleet.outbox) == 0, 15, "the outbox to be flushed")
        assert agent.fleet.status()["broker"] == "connected"
        wait_for(lambda: sum(w["counts"]["inputs"] for w in gw.store.telemetry.history("dev-a")) == 20, 20,
                 "the queued window in the gateway's store")
        wait_for(lambda: ((gw.store.devices.get("dev-a") or {}).get("status") or {}).get("state") == "online", 15,
                 "the agent's online status")
    finally:
        agent.stop()
        gw.stop()
    (window,) = [w for w in gw.store.telemetry.history("dev-a") if w["counts"]["inputs"]]  # (stop() closes an empty one)
    assert window["counts"]["fallback"] == 20 and window["seq"] == 0


def test_cli_without_a_reachable_broker_answers_and_keeps_its_telemetry(tiny_cascade, tmp_path):
    from cloud_gateway.broker import free_port

    run = tiny_cascade
    np.savez(tmp_path / "in.npz", x=run.x_test[:15], y=run.y_test[:15])
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "device_agent.cli", "run", "--bundle", str(run.bundle_dir),
                        "--source", str(tmp_path / "in.npz"), "--device-id", "dev-a",
                        "--broker", f"mqtt://127.0.0.1:{free_port()}", "--username", "dev-a", "--password", "pw",
                        "--state-dir", str(tmp_path / "state"), "--output", str(tmp_path / "a.jsonl"), "--json",
                        "--trust-key", str(release_pub_path())], capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert "working without it" in r.stderr and "Traceback" not in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["inputs"] == 15
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 15
    with sqlite3.connect(tmp_path / "state" / "outbox.sqlite") as db:  # sent at the next start with a broker
        (queued,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
    assert queued >= 1
    assert took < 30, f"took {took:.1f} s"
