"""Telemetry is never silently lost: answers = inputs in stored telemetry + inputs reported dropped.

Through a real Mosquitto and gateway: the agent killed with SIGKILL mid-stream
(its open window is in a memory-mapped file), restarted, stopped with SIGTERM,
its state dir wiped (a new boot id, seq from 0 again: not taken for
duplicates), and the broker stopped while windows pile up past the outbox bound.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from edgecore import wire
from tests.agent.tiny import (
    Listener,
    items,
    make_agent,
    release_pub_path,
    start_gateway,
    wait_for,
)

pytestmark = pytest.mark.broker


def _stored(gw, device: str) -> tuple[int, dict[str, int]]:
    """(inputs over every stored window, dropped inputs per boot: the last report of each)."""
    hist = gw.store.telemetry.history(device, limit=10000)
    dropped: dict[str, int] = {}
    for w in hist:
        dropped[w["boot"]] = max(dropped.get(w["boot"], 0), w["outbox"]["dropped_inputs"])
    return sum(w["counts"]["inputs"] for w in hist), dropped


class _AgentProcess:
    """``device-agent run --source mqtt:`` as a child process, fed over MQTT."""

    def __init__(self, broker, run, tmp, state, out, *, window: float) -> None:
        user, pw = broker.credentials("dev-b")
        self.out = out
        self.watch = Listener(broker, ["fleet/dev-b/answers", "fleet/dev-b/status"], client_id=f"w-{out.name}")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "device_agent.cli", "run", "--bundle", str(run.bundle_dir), "--source", "mqtt:",
             "--device-id", "dev-b", "--broker", broker.url, "--username", user, "--password", pw,
             "--state-dir", str(state), "--window", str(window), "--output", str(out),
             "--trust-key", str(release_pub_path())],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: any(t.endswith("status") and json.loads(p).get("state") == "online"
                             for t, p in self.watch.messages), 60, "agent online")  # and subscribed to its input
        self.feeder = Listener(broker, ["fleet/none"], client_id=f"f-{out.name}")

    def feed(self, x) -> None:
        n = self.answers() + len(x)
        self.feeder.client.publish("fleet/dev-b/input", wire.encode_tensor(x), qos=1).wait_for_publish(5)
        wait_for(lambda: self.answers() >= n, 30, f"{n} answers")

    def answers(self) -> int:
        return sum(t.endswith("answers") for t, _ in self.watch.messages)

    def end(self, sig: int) -> int:
        self.p.send_signal(sig)
        self.p.communicate(timeout=30)
        self.feeder.stop()
        self.watch.stop()
        return len(self.out.read_text().splitlines())


def test_kill_9_restart_and_state_reset_lose_no_input(mosquitto, tiny_cascade, tmp_path):
    run = tiny_cascade
    state = tmp_path / "state"
    with start_gateway(mosquitto, run, tmp_path, http=False) as gw:
        a = _AgentProcess(mosquitto, run, tmp_path, state, tmp_path / "a1.jsonl", window=60)
        a.feed(run.x_test[:12])
        answered = a.end(signal.SIGKILL)  # the window is open: nothing of it was sent yet
        b = _AgentProcess(mosquitto, run, tmp_path, state, tmp_path / "a2.jsonl", window=0.3)
        b.feed(run.x_test[12:19])
        answered += b.end(signal.SIGTERM)
        shutil.rmtree(state)  # a wiped device: seq starts at 0 again
        c = _AgentProcess(mosquitto, run, tmp_path, state, tmp_path / "a3.jsonl", window=0.3)
        c.feed(run.x_test[19:24])
        answered += c.end(signal.SIGTERM)
        assert answered == 24
        try:
            wait_for(lambda: _stored(gw, "dev-b")[0] >= answered, 20, "telemetry of every answer")
        finally:
            stored, dropped = _stored(gw, "dev-b")
        hist = gw.store.telemetry.history("dev-b", limit=10000)
    assert stored + sum(dropped.values()) == answered, (stored, dropped, answered)
    assert len(dropped) == 2  # two state dirs, two boot ids
    assert min(w["seq"] for w in hist if w["boot"] == hist[-1]["boot"]) == 0  # the reset device counted from 0


def test_broker_outage_past_the_outbox_bound_reports_what_it_dropped(mosquitto, tiny_cascade, tmp_path):
    run = tiny_cascade
    gw = start_gateway(mosquitto, run, tmp_path, http=False)
    agent = make_agent(mosquitto, run.bundle_dir, "dev-a", tmp_path, telemetry_window_s=0.1, deadline_s=0.2,
                       outbox_max_rows=3).start()
    stop = threading.Event()
    answered: list[int] = []

    def stream() -> None:
        while not stop.is_set():
            answered.extend(1 for _ in agent.run(items(run.x_test[:5])))
            time.sleep(0.02)

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    try:
        wait_for(lambda: len(gw.store.telemetry.arrival_order("dev-a")) >= 2, 15, "first windows stored")
        mosquitto.stop()
        wait_for(lambda: agent.fleet.outbox.stats()["dropped_inputs"] > 0, 15, "windows dropped by the bound")
        mosquitto.start()
        wait_for(lambda: len(agent.fleet.outbox) == 0, 20, "outbox drained after the restart")
    finally:
        stop.set()
        t.join(10)
        agent.stop()
    try:
        def accounted() -> int:
            stored, dropped = _stored(gw, "dev-a")
            return stored + sum(dropped.values())

        wait_for(lambda: accounted() >= len(answered), 15, "the last windows")
    finally:
        stored, dropped = _stored(gw, "dev-a")
        gw.stop()
    assert sum(dropped.values()) > 0
    assert stored + sum(dropped.values()) == len(answered), (stored, dropped, len(answered))


def test_a_window_the_gateway_could_not_store_is_sent_again_until_it_is(mosquitto, tiny_cascade, tmp_path):
    """The broker's PUBACK says the broker has a window, not that a gateway stored it: windows that reached the
    broker while the gateway's database was down were lost. The gateway acknowledges each window it stored on
    ``<prefix>/<id>/telemetry/ack``; the agent keeps a window until then, and sends it again."""
    run = tiny_cascade
    gw = start_gateway(mosquitto, run, tmp_path, http=False)
    agent = make_agent(mosquitto, run.bundle_dir, "dev-a", tmp_path, telemetry_window_s=0.1,
                       telemetry_resend_s=0.5).start()
    real_add = gw.store.telemetry.add_many
    try:
        list(agent.run(items(run.x_test[:10])))
        wait_for(lambda: _stored(gw, "dev-a")[0] == 10, 10, "the first 10 inputs stored")
        wait_for(lambda: agent.fleet.outbox.acks_from_gateway and len(agent.fleet.outbox) == 0, 10, "acknowledged")

        def database_down(*a, **kw):  # type: ignore[no-untyped-def]
            raise OSError("the database is down")

        gw.store.telemetry.add_many = database_down  # type: ignore[method-assign]
        list(agent.run(items(run.x_test[10:30])))
        wait_for(lambda: len(agent.fleet.outbox) > 0, 5, "windows waiting for the gateway")
        time.sleep(1.0)  # the broker took them, the gateway could not store them: they stay
        assert _stored(gw, "dev-a")[0] == 10 and len(agent.fleet.outbox) > 0
        gw.store.telemetry.add_many = real_add  # type: ignore[method-assign]
        wait_for(lambda: _stored(gw, "dev-a")[0] == 30, 15, "the outage's windows stored once it is back")
        wait_for(lambda: len(agent.fleet.outbox) == 0, 10, "the outbox drained")
    finally:
        gw.store.telemetry.add_many = real_add  # type: ignore[method-assign]
        agent.stop()
        gw.stop()
    stored, dropped = _stored(gw, "dev-a")
    assert stored == 30 and sum(dropped.values()) == 0  # each window once, none dropped


def test_windows_sent_before_any_gateway_acknowledged_wait_for_one_and_the_status_says_so(
        mosquitto, tiny_cascade, tmp_path):
    """A PUBACK is not storage, from the first window on: with no gateway running, the windows the broker took
    stay in the outbox (the status says ``telemetry: waiting (…)``), and a gateway that starts later stores
    every one of them, once."""
    run = tiny_cascade
    agent = make_agent(mosquitto, run.bundle_dir, "dev-a", tmp_path, telemetry_window_s=0.1,
                       telemetry_resend_s=0.3).start()
    gw = None
    try:
        list(agent.run(items(run.x_test[:12])))
        wait_for(lambda: agent.fleet.status()["telemetry"].startswith("waiting"), 10, "the status saying it waits")
        assert "no gateway has acknowledged" in agent.fleet.status()["telemetry"]
        assert len(agent.fleet.outbox) > 0 and not agent.fleet.outbox.acks_from_gateway
        gw = start_gateway(mosquitto, run, tmp_path, http=False)
        wait_for(lambda: _stored(gw, "dev-a")[0] == 12, 15, "every input's window stored once a gateway runs")
        wait_for(lambda: len(agent.fleet.outbox) == 0 and agent.fleet.status()["telemetry"] == "ok", 10, "drained, ok")
    finally:
        agent.stop()
        if gw is not None:
            gw.stop()
    stored, dropped = _stored(gw, "dev-a")
    assert stored == 12 and sum(dropped.values()) == 0
