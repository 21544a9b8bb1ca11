"""``device-agent`` command line: edge-only and through the broker with a gateway."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from tests.agent.tiny import Listener, release_pub_path, start_gateway, wait_for
from tests.fixtures.broker import MosquittoBroker, running_mosquitto


def _agent(*args, timeout=120):
    trust = ["--trust-key", str(release_pub_path())] if args[0] in ("run", "verify") else []
    return subprocess.run([sys.executable, "-m", "device_agent.cli", *args, *trust], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_edge_only_on_npz_and_refuses_bad_input(tiny_cascade, tmp_path):
    run = tiny_cascade
    np.savez(tmp_path / "in.npz", x=run.x_test[:30], y=run.y_test[:30])
    r = _agent("run", "--bundle", str(run.tarball), "--source", str(tmp_path / "in.npz"), "--device-id", "d1",
               "--output", str(tmp_path / "a.jsonl"), "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(lines) == 30 and {a["route"] for a in lines} <= {"edge", "fallback"}
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["inputs"] == 30 and summary["accuracy"] > 0.8
    r = _agent("run", "--bundle", str(tmp_path / "nope"), "--source", str(tmp_path / "in.npz"), "--device-id", "d1")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "no such bundle" in r.stderr
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 5)))
    r = _agent("run", "--bundle", str(run.bundle_dir), "--source", str(tmp_path / "bad.npz"), "--device-id", "d1")
    assert r.returncode == 2 and "does not match" in r.stderr
    r = _agent("verify", str(run.bundle_dir))
    assert r.returncode == 0 and "ok:" in r.stdout


@pytest.mark.broker
def test_cli_through_the_broker(mosquitto, tiny_cascade, tmp_path):
    run = tiny_cascade
    np.savez(tmp_path / "in.npz", x=run.x_test[:40], y=run.y_test[:40])
    creds = tmp_path / "creds.json"
    user, pw = mosquitto.credentials("dev-d")
    creds.write_text(json.dumps({"username": user, "password": pw}))
    watch = Listener(mosquitto, ["fleet/dev-d/#"])
    with start_gateway(mosquitto, run, tmp_path, http=False):
        r = _agent("run", "--bundle", str(run.bundle_dir), "--source", str(tmp_path / "in.npz"), "--device-id",
                   "dev-d", "--broker", mosquitto.url, "--credentials", str(creds), "--threshold", "1.01",
                   "--window", "0.2", "--deadline", "2", "--state-dir", str(tmp_path / "state"), "--json")
    watch.stop()
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["cloud"] == 40
    topics = {t for t, _ in watch.messages}
    assert {"fleet/dev-d/status", "fleet/dev-d/telemetry", "fleet/dev-d/infer/req"} <= topics
    status = [json.loads(p) for t, p in watch.messages if t.endswith("status")]
    assert status[0]["state"] == "online" and status[-1]["state"] == "offline"
    r = _agent("run", "--bundle", str(run.bundle_dir), "--source", str(tmp_path / "in.npz"), "--device-id", "dev-d",
               "--broker", mosquitto.url, "--username", "dev-d", "--password", "wrong", "--state-dir",
               str(tmp_path / "s2"))
    assert r.returncode == 2 and "could not connect" in r.stderr
    assert "refused the login: Not authorized (check the username and password" in r.stderr


class _LoggingMosquitto(MosquittoBroker):
    """The test broker, logging every packet: the order it handled them in is in its log."""

    def _write_files(self) -> None:
        super()._write_files()
        conf = self.root / "mosquitto.conf"
        conf.write_text(conf.read_text() + "log_type debug\n")


@pytest.fixture
def logging_mosquitto(tmp_path_factory):
    yield from running_mosquitto(_LoggingMosquitto, tmp_path_factory, "mosquitto-debug")


@pytest.mark.broker
def test_cli_mqtt_source_answers_on_the_answers_topic(logging_mosquitto, tiny_cascade, tmp_path):
    """A feeder that publishes the moment the agent says ``online`` loses nothing: the input subscription was
    acknowledged before the status went out (the broker's log shows the order it handled them in)."""
    import signal

    from edgecore import wire

    broker = logging_mosquitto
    run = tiny_cascade
    user, pw = broker.credentials("dev-c")
    feeder = Listener(broker, ["fleet/none"], client_id="feeder")
    fed = threading.Event()

    def feed_when_online(c, u, m):  # no pause between seeing `online` and sending the inputs
        watch.messages.append((m.topic, m.payload))
        if m.topic.endswith("status") and json.loads(m.payload).get("state") == "online" and not fed.is_set():
            fed.set()
            feeder.client.publish("fleet/dev-c/input", wire.encode_tensor(run.x_test[:5]), qos=1)
            feeder.client.publish("fleet/dev-c/input", b"garbage", qos=1)  # answered with an error, not fatal
            feeder.client.publish("fleet/dev-c/input", wire.encode_tensor(run.x_test[5]), qos=1)

    watch = Listener(broker, ["fleet/dev-c/answers", "fleet/dev-c/status"])
    watch.client.on_message = feed_when_online
    p = subprocess.Popen([sys.executable, "-m", "device_agent.cli", "run", "--bundle", str(run.bundle_dir),
                          "--source", "mqtt:", "--device-id", "dev-c", "--broker", broker.url, "--username", user,
                          "--password", pw, "--state-dir", str(tmp_path / "s"), "--output", str(tmp_path / "a.jsonl"),
                          "--trust-key", str(release_pub_path())],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(fed.is_set, 60, "the agent's online status")
        wait_for(lambda: sum(t.endswith("answers") for t, _ in watch.messages) >= 7, 30, "7 answers")
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
        feeder.stop()
        watch.stop()
    got = [json.loads(m) for t, m in watch.messages if t.endswith("answers")]
    refused = [g for g in got if g.get("ok") is False]
    assert len(refused) == 1 and refused[0]["error"].startswith("not an input tensor")
    got = [g for g in got if g.get("ok") is not False]
    assert len(got) == 6 and [g["true_label"] for g in got] == [None] * 6
    preds = [g["prediction"] for g in got]
    assert sum(pr == int(t) for pr, t in zip(preds, run.y_test[:6])) >= 5
    assert p.returncode == 0, err
    log = broker.log_path.read_text().splitlines()
    subscribed = next(i for i, ln in enumerate(log) if "fleet/dev-c/input (QoS 1)" in ln)
    online = next(i for i, ln in enumerate(log) if "Received PUBLISH from agent-dev-c" in ln and "status" in ln)
    assert subscribed < online, "the agent said online before it subscribed to its input topic"


@pytest.mark.broker
def test_cli_joins_an_anonymous_broker_without_credentials(anonymous_mosquitto, mosquitto, tiny_cascade, tmp_path):
    run = tiny_cascade
    np.savez(tmp_path / "in.npz", x=run.x_test[:20], y=run.y_test[:20])
    with start_gateway(anonymous_mosquitto, run, tmp_path, http=False):
        r = _agent("run", "--bundle", str(run.bundle_dir), "--source", str(tmp_path / "in.npz"), "--device-id",
                   "lab-1", "--broker", anonymous_mosquitto.url, "--threshold", "1.01", "--window", "0.2",
                   "--state-dir", str(tmp_path / "s"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["cloud"] == 20  # connected, asked the cloud, got answers
    r = _agent("run", "--bundle", str(run.bundle_dir), "--source", str(tmp_path / "in.npz"), "--device-id", "dev-a",
               "--broker", mosquitto.url, "--state-dir", str(tmp_path / "s2"))
    assert r.returncode == 2 and "does not take anonymous clients" in r.stderr  # a broker with passwords says so


def test_trust_errors_name_the_tarball_the_user_gave_not_a_temporary_folder(tiny_cascade, tmp_path):
    """A refused ``.tar.gz`` is named as given: the folder it was extracted to is gone and means nothing."""
    import shutil
    import tarfile

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    run = tiny_cascade
    other = tmp_path / "other.pub"  # a key that did not sign the bundle
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    r = subprocess.run([sys.executable, "-m", "device_agent.cli", "verify", str(run.tarball), "--trust-key", str(other)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"error: {run.tarball}: signed by"), r.stderr
    assert "bundle-" not in r.stderr and "/tmp" not in r.stderr.replace(str(run.tarball), ""), r.stderr
    # a tampered file inside the archive: the hash check names the archive too
    bad = tmp_path / "bad"
    shutil.copytree(run.bundle_dir, bad / "bundle")
    (bad / "bundle" / "drift_reference.json").write_text("{}")
    tar = tmp_path / "tampered.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(bad / "bundle", arcname="bundle")
    r = _agent("run", "--bundle", str(tar), "--source", str(tmp_path), "--device-id", "d1")
    assert r.returncode == 2 and r.stderr.startswith(f"error: {tar}: refused: ") or \
        r.stderr.startswith(f"error: bundle {tar} cannot be trusted"), r.stderr
    assert "bundle-" not in r.stderr.replace(str(tar), ""), r.stderr
    r = _agent("verify", str(run.tarball))
    assert r.returncode == 0 and r.stdout.startswith(f"ok: {run.tarball} "), r.stdout
