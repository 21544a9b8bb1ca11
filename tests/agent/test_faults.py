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
    import numpy as np

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
