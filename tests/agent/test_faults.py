"""Faults that must not silently stop a part of the agent."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from tests.agent.tiny import Listener, items, make_agent, release_pub_path, release_trust, wait_for


@pytest.mark.broker
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


def _unpacked(tmp) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(d.name for d in tmp.iterdir() if d.name.startswith("device-agent"))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_bundle_unpacked_by_an_agent_killed_with_sigkill_is_removed_at_the_next_start(tiny_cascade, tmp_path,
                                                                                        monkeypatch):
    """``kill -9`` skips every cleanup: the bundle the agent unpacked stayed in the temp folder. The next start
    of an agent for that device removes it, and leaves alone what is not its own (another device's, a running
    agent's)."""
    from device_agent.agent import Agent, AgentConfig

    run = tiny_cascade
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(50):
        np.save(inputs / f"{i:02d}.npy", run.x_test[i])
    state = tmp_path / "state"
    out = tmp_path / "answers.jsonl"
    p = subprocess.Popen([sys.executable, "-m", "device_agent.cli", "run", "--bundle", str(run.tarball),
                          "--device-id", "dev-x", "--source", str(inputs), "--rate", "5", "--output", str(out),
                          "--state-dir", str(state), "--trust-key", str(release_pub_path())],
                         env={**os.environ, "TMPDIR": str(tmp)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: out.is_file() and out.read_text().count("\n") >= 1, 60, "the agent answering")
        left = _unpacked(tmp)
        assert len(left) == 1 and left[0].startswith(f"device-agent.dev-x.{p.pid}."), left
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    assert _unpacked(tmp) == left  # what kill -9 left
    other = tmp / f"device-agent.dev-y.{_dead_pid()}.abc"  # another device's
    live = tmp / f"device-agent.dev-x.{os.getppid()}.abc"  # an agent of this device still running
    crashed_fetch = state / f"fetch.{_dead_pid()}.abc"  # an update a killed agent was downloading
    for d in (other, live, crashed_fetch):
        d.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    t0 = time.monotonic()
    agent = Agent(run.tarball, AgentConfig(device_id="dev-x", trust=release_trust(), threads=1, state_dir=state))
    assert time.monotonic() - t0 < 10
    now = _unpacked(tmp)
    mine = [n for n in now if n.startswith(f"device-agent.dev-x.{os.getpid()}.")]
    assert sorted(set(now) - set(mine)) == sorted([other.name, live.name]) and len(mine) == 1
    assert not crashed_fetch.exists()
    agent.bundle.close()
    assert not (tmp / mine[0]).exists()


def _run_mqtt(agent):  # type: ignore[no-untyped-def]
    """Start ``agent`` answering its MQTT input topic on a thread; returns (source, thread)."""
    import threading

    src = agent.fleet.mqtt_source()
    agent.start()
    t = threading.Thread(target=lambda: [agent.fleet.publish_answer(a) for a in agent.run(src)], daemon=True)
    t.start()
    return src, t


@pytest.mark.broker
def test_inputs_sent_while_the_agent_is_down_are_answered_when_it_returns(mosquitto, tiny_cascade, tmp_path):
    """The agent keeps a session at the broker: QoS 1 inputs published while it is away (stopped, or killed) are
    queued there and answered, each by its id, once it is back. (With a clean session they were never answered
    and nothing reported it.)"""
    from edgecore import wire

    run = tiny_cascade
    watch = Listener(mosquitto, ["fleet/dev-a/answers"], client_id="watch")
    feeder = Listener(mosquitto, ["fleet/dev-a/answers"], client_id="feeder", creds=mosquitto.credentials("dev-a"))
    first = make_agent(mosquitto, run.bundle_dir, "dev-a", tmp_path)
    src, t = _run_mqtt(first)
    src.close()
    t.join(10)
    first.stop()  # down: nobody is subscribed to the input topic now
    for i in range(5):
        feeder.client.publish("fleet/dev-a/input", wire.encode_tensor(run.x_test[i].astype(np.float32)), qos=1,
                              properties=_corr(f"while-down-{i}")).wait_for_publish(5)
    again = make_agent(mosquitto, run.bundle_dir, "dev-a", tmp_path)
    src, t = _run_mqtt(again)
    try:
        wait_for(lambda: len(watch.messages) >= 5, 10, "the 5 inputs sent while the agent was down answered")
    finally:
        src.close()
        t.join(10)
        again.stop()
        feeder.stop()
        watch.stop()
    ids = sorted(json.loads(p)["id"] for _, p in watch.messages)
    assert ids == [f"while-down-{i}" for i in range(5)]


def _corr(text: str):  # type: ignore[no-untyped-def]
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = text.encode()
    return props


@pytest.mark.broker
def test_a_command_for_a_device_that_is_away_expires_with_its_rollouts_wait(mosquitto, tiny_cascade, tmp_path):
    """The session that keeps inputs would keep commands too: the gateway's commands carry an expiry (the
    command's lifetime, at least its rollouts' wait), so one sent long before the device returns is never
    applied, one sent just before is."""
    import urllib.request

    from tests.agent.tiny import start_gateway

    run = tiny_cascade
    watch = Listener(mosquitto, ["fleet/dev-a/status"], client_id="watch")
    with start_gateway(mosquitto, run, tmp_path) as gw:
        gw.config.rollout_update_timeout_s = gw.config.command_ttl_s = 1.0

        def cmd(threshold: float) -> None:
            req = urllib.request.Request(f"{gw.http_url}/api/devices/dev-a/cmd", method="POST",
                                         data=json.dumps({"cmd": "set_threshold", "threshold": threshold}).encode(),
                                         headers={"Authorization": "Bearer test-token",
                                                  "Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=10).read()

        make_agent(mosquitto, run.bundle_dir, "dev-a", tmp_path).start().stop()  # its session stays
        cmd(0.33)
        time.sleep(2.2)  # past the command's expiry
        cmd(0.44)
        with make_agent(mosquitto, run.bundle_dir, "dev-a", tmp_path) as agent:
            wait_for(lambda: agent.threshold == 0.44, 10, "the recent command applied")
    watch.stop()
    seen = [json.loads(p).get("threshold") for _, p in watch.messages]
    assert 0.44 in seen and 0.33 not in seen
