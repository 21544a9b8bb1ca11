"""Faults that must not silently stop a part of the agent."""

from __future__ import annotations

import errno
import json

import pytest

from tests.agent.tiny import Listener, items, make_agent, wait_for

pytestmark = pytest.mark.broker


def test_a_full_disk_degrades_telemetry_and_it_recovers_with_nothing_lost(mosquitto, tiny_cascade, tmp_path):
    """A full disk killed the telemetry thread for good: no window closed even after space came back, while the
    agent kept answering. The thread survives, the status says ``telemetry: degraded (disk full)``, and once
    the disk has room the windows close again, the inputs of the outage counted in them."""
    run = tiny_cascade
    agent = make_agent(mosquitto, run.bundle_dir, "dev-a", tmp_path, telemetry_window_s=0.2)
    watch = Listener(mosquitto, ["fleet/dev-a/telemetry", "fleet/dev-a/status"], client_id="watch")
    box = agent.fleet.outbox
    real_put = box.put
    full = {"on": False}

    def put(*a, **kw):  # type: ignore[no-untyped-def]
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(*a, **kw)

    box.put = put  # type: ignore[method-assign]

    def statuses() -> list[dict]:
        return [json.loads(p) for t, p in watch.messages if t.endswith("/status")]

    def inputs_sent() -> int:
        return sum(json.loads(p)["counts"]["inputs"] for t, p in watch.messages if t.endswith("/telemetry"))

    with agent:
        list(agent.run(items(run.x_test[:10])))
        wait_for(lambda: inputs_sent() == 10, 10, "the first 10 inputs in telemetry")
        full["on"] = True
        list(agent.run(items(run.x_test[10:30])))  # answered while the disk is full
        wait_for(lambda: agent.fleet.status()["telemetry"] == "degraded (disk full)", 5, "degraded in the status")
        wait_for(lambda: statuses()[-1].get("telemetry") == "degraded (disk full)", 5, "the published status")
        sent = len([1 for t, _ in watch.messages if t.endswith("/telemetry")])
        full["on"] = False  # space came back
        wait_for(lambda: inputs_sent() == 30, 10, "the outage's 20 inputs in a later window")
        wait_for(lambda: statuses()[-1].get("telemetry") == "ok", 5, "the status back to ok")
        assert all(t.is_alive() for t in agent.fleet._threads)
        assert len([1 for t, _ in watch.messages if t.endswith("/telemetry")]) > sent
    watch.stop()
