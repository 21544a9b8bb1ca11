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
        _wait(lambda: len(gw.store.arrival_order("dev-a")) >= 3, 15, "first windows stored")
        mosquitto.stop()
        produced_before = agent.windows_produced
        # windows pile up in the outbox while the broker is gone
        _wait(lambda: agent.windows_produced >= produced_before + 4 and len(agent.outbox) >= 4, 15, "outbox filling")
        mosquitto.start()
        _wait(lambda: len(agent.outbox) == 0, 20, "outbox drained after the restart")
    finally:
        stop.set()
        t.join(10)
        agent.stop()
    n = agent.windows_produced
    try:
        _wait(lambda: len(gw.store.arrival_order("dev-a")) >= n, 15, "all windows stored")
    except AssertionError:
        raise AssertionError(f"produced {n}, stored {gw.store.arrival_order('dev-a')}; log {mosquitto.log_path.read_text()[-3000:]}")
    gw.stop()
    order = gw.store.arrival_order("dev-a")
    assert order == list(range(n)), f"{n} produced, stored {order}"
    assert len(answered) > 0
    last = gw.store.history("dev-a", limit=1)[0]
    assert last["outbox"]["dropped"] == 0
    for w in gw.store.history("dev-a", limit=1000):  # what every window carries
        assert {"p50", "p95", "p99", "count"} <= set(w["latency"]["edge"]) and "cloud_rtt" in w["latency"]
        assert {"inputs", "edge", "cloud", "fallback"} <= set(w["counts"])
        assert w["bundle_sha256"] == agent.bundle.manifest_sha256 and "drift" in w and "offload_rate" in w
