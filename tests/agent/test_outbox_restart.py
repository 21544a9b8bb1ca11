"""Broker stopped mid-stream and restarted: every telemetry window arrives exactly once, in order."""

from __future__ import annotations

import threading
import time

import pytest

from tests.agent.tiny import items, make_agent, start_gateway
from tests.agent.tiny import wait_for as _wait

pytestmark = pytest.mark.broker


def test_broker_restart_delivers_every_window_once_in_order(mosquitto, tiny_cascade, tmp_path):
    run = tiny_cascade
    gw = start_gateway(mosquitto, run, tmp_path, http=False)
    agent = make_agent(mosquitto, run.bundle_dir, "dev-a", tmp_path, telemetry_window_s=0.2, deadline_s=0.3).start()
    stop = threading.Event()
    answered: list[int] = []

    def stream() -> None:  # inputs keep flowing through the outage
        while not stop.is_set():
            answered.extend(1 for _ in agent.run(items(run.x_test[:5])))
            time.sleep(0.02)

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    try:
        _wait(lambda: len(gw.store.telemetry.arrival_order("dev-a")) >= 3, 15, "first windows stored")
        mosquitto.stop()
        produced_before = agent.fleet.windows_produced
        # windows pile up in the outbox while the broker is gone
        _wait(lambda: agent.fleet.windows_produced >= produced_before + 4 and len(agent.fleet.outbox) >= 4, 15, "outbox filling")
        mosquitto.start()
        _wait(lambda: len(agent.fleet.outbox) == 0, 20, "outbox drained after the restart")
    finally:
        stop.set()
        t.join(10)
        agent.stop()
    n = agent.fleet.windows_produced
    try:
        _wait(lambda: len(gw.store.telemetry.arrival_order("dev-a")) >= n, 15, "all windows stored")
    except AssertionError:
        import json
        import sqlite3

        with sqlite3.connect(agent.fleet.outbox.path) as db:  # what the agent kept for its next start, if anything
            left = [json.loads(p).get("seq") for (p,) in db.execute("SELECT payload FROM outbox ORDER BY id")]
        raise AssertionError(f"produced {n}, stored {gw.store.telemetry.arrival_order('dev-a')}, "
                             f"still in the agent's outbox "
                             f"{left}; log {mosquitto.log_path.read_text()[-3000:]}") from None
    gw.stop()
    order = gw.store.telemetry.arrival_order("dev-a")
    assert order == list(range(n)), f"{n} produced, stored {order}"
    assert len(answered) > 0
    last = gw.store.telemetry.history("dev-a", limit=1)[0]
    assert last["outbox"]["dropped"] == 0
    for w in gw.store.telemetry.history("dev-a", limit=1000):  # what every window carries
        assert {"p50", "p95", "p99", "count"} <= set(w["latency"]["edge"]) and "cloud_rtt" in w["latency"]
        assert {"inputs", "edge", "cloud", "fallback"} <= set(w["counts"])
        assert w["bundle_sha256"] == agent.bundle.manifest_sha256 and "drift" in w and "offload_rate" in w


def test_stop_with_the_broker_gone_keeps_the_last_window_and_says_so(mosquitto, tiny_cascade, tmp_path, caplog):
    """Stopping while the broker is down cannot deliver the last window: it stays in the outbox on disk (a warning
    says how many and where), and the next start sends it."""
    import logging

    from device_agent.outbox import Outbox

    run = tiny_cascade
    gw = start_gateway(mosquitto, run, tmp_path, http=False)
    agent = make_agent(mosquitto, run.bundle_dir, "dev-b", tmp_path, telemetry_window_s=60).start()
    try:
        list(agent.run(items(run.x_test[:5])))
        mosquitto.stop()
    finally:
        with caplog.at_level(logging.WARNING, logger="device_agent.agent"):
            agent.stop(flush_timeout=0.3)
    assert "not confirmed" in caplog.text and "next start" in caplog.text, caplog.text
    box = Outbox(agent.fleet.outbox.path)
    try:
        assert len(box) >= 1  # the last window (and the status messages before it, if any)
    finally:
        box.close()
    mosquitto.start()
    again = make_agent(mosquitto, run.bundle_dir, "dev-b", tmp_path, telemetry_window_s=60).start()
    try:
        _wait(lambda: len(gw.store.telemetry.arrival_order("dev-b")) >= 1, 20, "the kept window delivered")
    finally:
        again.stop()
        gw.stop()
    assert gw.store.telemetry.arrival_order("dev-b")[0] == 0
