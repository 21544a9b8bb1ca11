"""Ingest at fleet scale (cloud_gateway/ingest.py), against a real Mosquitto: batched writes, an acknowledgement only
after the batch is committed, back-pressure that is counted and never a silent loss, statuses coalesced, replicas
splitting ingest over a shared subscription, retention."""

from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from tests.agent.tiny import Listener, start_gateway, wait_for

pytestmark = pytest.mark.broker


def _device(broker, device: str):  # type: ignore[no-untyped-def]
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{device}-raw", protocol=mqtt.MQTTv5)
    c.username_pw_set(*broker.credentials(device))
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def _window(device: str, seq: int, t_end: float | None = None) -> bytes:
    return json.dumps({"schema": 1, "device_id": device, "boot": "b1", "seq": seq, "counts": {"inputs": 1},
                       "t_end": time.time() if t_end is None else t_end, "offload_rate": 0.1}).encode()


def _send(c, device: str, seqs, **kw) -> None:  # type: ignore[no-untyped-def]
    for info in [c.publish(f"fleet/{device}/telemetry", _window(device, s, **kw), qos=1) for s in seqs]:
        info.wait_for_publish(10)


def _acked(listener: Listener) -> list[int]:
    return sorted(json.loads(p)["seq"] for _, p in listener.messages)


def _close(*clients) -> None:  # type: ignore[no-untyped-def]
    for c in clients:
        c.loop_stop()
        c.disconnect()


def test_windows_are_written_in_batches_and_acknowledged_only_after_the_commit(mosquitto, tiny_cascade, tmp_path):
    with start_gateway(mosquitto, tiny_cascade, tmp_path, http=False) as gw:
        acks = Listener(mosquitto, ["fleet/+/telemetry/ack"], client_id="acks")
        acks.ready.wait(5)
        gate, inside = threading.Event(), threading.Event()
        real = gw.store.telemetry.add_many
        commits: list[int] = []

        def slow_commit(items, **kw):  # type: ignore[no-untyped-def]
            inside.set()
            gate.wait(10)  # the database is slow: what arrives meanwhile is the next batch
            new = real(items, **kw)
            commits.append(len(items))
            return new

        gw.store.telemetry.add_many = slow_commit  # type: ignore[method-assign]
        devs = [_device(mosquitto, d) for d in ("dev-a", "dev-b")]
        try:
            _send(devs[0], "dev-a", range(1))
            wait_for(inside.is_set, 5, "the first batch in the store")
            for c, d in zip(devs, ("dev-a", "dev-b")):
                _send(c, d, range(1, 200))
            time.sleep(0.5)
            assert acks.messages == []  # nothing acknowledged before its batch committed
            assert gw.store.telemetry.arrival_order("dev-a") == []
            gate.set()
            wait_for(lambda: len(acks.messages) == 399, 15, "every window acknowledged")
        finally:
            _close(*devs)
            acks.stop()
        assert gw.store.telemetry.arrival_order("dev-a") == list(range(200))
        assert len(gw.store.telemetry.arrival_order("dev-b")) == 199
        assert commits[0] == 1 and len(commits) < 20 and max(commits) > 50, commits  # batches, not one per message
        assert gw.metrics.value("gateway_telemetry_windows_total", device="dev-b") == 199


def test_a_failed_batch_is_not_acknowledged_and_the_resent_windows_are_stored_once(mosquitto, tiny_cascade, tmp_path):
    with start_gateway(mosquitto, tiny_cascade, tmp_path, http=False) as gw:
        acks = Listener(mosquitto, ["fleet/dev-a/telemetry/ack"], client_id="acks")
        acks.ready.wait(5)
        real = gw.store.telemetry.add_many

        def down(items, **kw):  # type: ignore[no-untyped-def]
            raise OSError("the database is down")

        gw.store.telemetry.add_many = down  # type: ignore[method-assign]
        c = _device(mosquitto, "dev-a")
        try:
            _send(c, "dev-a", range(10))
            wait_for(lambda: gw.metrics.value("gateway_ingest_store_errors_total") >= 1, 5, "the failed batch")
            time.sleep(0.3)
            assert acks.messages == []  # not stored, so not acknowledged: the agent keeps them and sends again
            gw.store.telemetry.add_many = real  # type: ignore[method-assign]
            _send(c, "dev-a", range(10))  # what an agent does after telemetry_resend_s
            wait_for(lambda: len(acks.messages) == 10, 10, "the resent windows acknowledged")
        finally:
            _close(c)
            acks.stop()
        assert gw.store.telemetry.arrival_order("dev-a") == list(range(10))


def test_a_full_queue_is_back_pressure_counted_never_a_silent_loss(mosquitto, tiny_cascade, tmp_path):
    """With the database stalled and the queue full the MQTT thread waits (counted), then refuses (counted, not
    acknowledged, so resent): every window offered is either acknowledged or counted as refused."""
    with start_gateway(mosquitto, tiny_cascade, tmp_path, http=False, ingest_queue=5, ingest_batch=5,
                       ingest_block_s=0.05) as gw:
        acks = Listener(mosquitto, ["fleet/dev-a/telemetry/ack"], client_id="acks")
        acks.ready.wait(5)
        gate = threading.Event()
        real = gw.store.telemetry.add_many
        gw.store.telemetry.add_many = lambda items, **kw: (gate.wait(10), real(items, **kw))[1]  # type: ignore
        c = _device(mosquitto, "dev-a")
        try:
            _send(c, "dev-a", range(60))
            m = gw.metrics
            wait_for(lambda: m.value("gateway_ingest_refused_total", kind="telemetry") > 0, 10, "a refusal")
            gate.set()
            time.sleep(1.0)
            wait_for(lambda: len(acks.messages) + m.value("gateway_ingest_refused_total", kind="telemetry") == 60,
                     10, "each window acknowledged or counted refused")
            assert m.value("gateway_ingest_backpressure_total", kind="telemetry") >= \
                m.value("gateway_ingest_refused_total", kind="telemetry")
            assert "gateway_ingest_refused_total" in m.render()
            refused = set(range(60)) - set(_acked(acks))
            _send(c, "dev-a", sorted(refused))  # the agents send the unacknowledged ones again
            wait_for(lambda: len(gw.store.telemetry.arrival_order("dev-a")) == 60, 10, "all 60 stored")
        finally:
            _close(c)
            acks.stop()


def test_replicas_split_ingest_over_a_shared_subscription(mosquitto, tiny_cascade, tmp_path):
    db = str(tmp_path / "shared.sqlite")
    with start_gateway(mosquitto, tiny_cascade, tmp_path / "g0", replica="gw-0", http=False, db=db,
                       ingest_group="ingest") as g0, \
            start_gateway(mosquitto, tiny_cascade, tmp_path / "g1", replica="gw-1", http=False, db=db,
                          ingest_group="ingest") as g1:
        assert g0.worker.sub_tel == "$share/ingest/fleet/+/telemetry"
        acks = Listener(mosquitto, ["fleet/+/telemetry/ack"], client_id="acks")
        acks.ready.wait(5)
        devs = {d: _device(mosquitto, d) for d in ("dev-a", "dev-b")}
        try:
            for d, c in devs.items():
                c.publish(f"fleet/{d}/status", json.dumps({"schema": 1, "state": "online", "model": "digits"}),
                          qos=1).wait_for_publish(5)
                _send(c, d, range(40))
            wait_for(lambda: len(acks.messages) == 80, 10, "80 acknowledgements")
            time.sleep(0.3)
        finally:
            _close(*devs.values())
            acks.stop()
        assert len(acks.messages) == 80  # each window acknowledged once: one replica received it
        for d in ("dev-a", "dev-b"):
            assert sorted(g0.store.telemetry.arrival_order(d)) == list(range(40))  # once each (order: per replica)
            assert g0.store.devices.get(d)["model_line"] == "digits"
        got = [g.metrics.value("gateway_telemetry_windows_total", device="dev-a") for g in (g0, g1)]
        assert sum(got) == 40 and min(got) > 0, got  # split between the two


def test_a_replica_on_a_shared_subscription_still_reads_the_retained_statuses(mosquitto, tiny_cascade, tmp_path):
    """A shared subscription is sent no retained message: statuses published before the replica came are read
    through a short unshared subscription at connect."""
    c = _device(mosquitto, "dev-a")
    c.publish("fleet/dev-a/status", json.dumps({"schema": 1, "state": "online", "model": "digits"}), qos=1,
              retain=True).wait_for_publish(5)
    _close(c)
    with start_gateway(mosquitto, tiny_cascade, tmp_path, http=False, ingest_group="ingest") as gw:
        wait_for(lambda: (gw.store.devices.get("dev-a") or {}).get("model_line") == "digits", 10, "the retained one")


def test_retention_deletes_old_raw_windows(mosquitto, tiny_cascade, tmp_path):
    with start_gateway(mosquitto, tiny_cascade, tmp_path, http=False, telemetry_retention_days=1.0,
                       retention_sweep_s=0.2) as gw:
        gw.worker.ingest._next_sweep = time.monotonic() + 60  # no sweep until the windows are in
        c = _device(mosquitto, "dev-a")
        try:
            _send(c, "dev-a", range(5), t_end=time.time() - 2 * 86400)  # two days old
            _send(c, "dev-a", range(5, 8))
            wait_for(lambda: len(gw.store.telemetry.arrival_order("dev-a")) == 8, 10, "8 windows stored")
            gw.worker.ingest._next_sweep = 0.0
            wait_for(lambda: gw.store.telemetry.arrival_order("dev-a") == [5, 6, 7], 10, "the old ones deleted")
        finally:
            _close(c)
        assert gw.metrics.value("gateway_telemetry_expired_total") == 5
        hourly = gw.store.telemetry.hourly("dev-a")  # what went is kept per hour
        assert sum(h["windows"] for h in hourly) == 5 and sum(h["inputs"] for h in hourly) == 5
