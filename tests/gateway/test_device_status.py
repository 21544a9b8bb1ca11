"""A device's status is its word only about itself: checked, bounded, and never able to break the API for the
fleet (a 3 MiB status was stored and re-served on every dashboard poll; a NaN made ``/api/devices`` invalid JSON
and blanked the dashboard for everyone)."""

from __future__ import annotations

import json
import math
import time

import paho.mqtt.client as mqtt
import pytest

from cloud_gateway.api import create_app
from cloud_gateway.metrics import Metrics
from cloud_gateway.store import GatewayStore
from tests.agent.tiny import release_trust, start_gateway, wait_for


def _strict(body: bytes):  # type: ignore[no-untyped-def]
    """Parse as a browser does: NaN and Infinity are not JSON."""
    def refuse(c: str):  # type: ignore[no-untyped-def]
        raise ValueError(f"{c} is not JSON")
    return json.loads(body, parse_constant=refuse)


def test_the_api_never_sends_invalid_json_whatever_the_store_holds(tmp_path):
    store = GatewayStore(tmp_path / "g.sqlite")  # rows stored before statuses were checked
    store.devices.set_status("dev-a", {"state": "online", "threshold": math.nan, "x": [math.inf, 1.5]})
    store.devices.set_last_telemetry("dev-a", {"offload_rate": -math.inf, "drift": {"flag": True}}, 1.0)
    store.devices.set_status("dev-b", {"state": "online", "threshold": 0.5})
    app = create_app(store=store, metrics=Metrics(), bundles_dir=tmp_path / "b", token="tok", trust=release_trust())
    c = app.test_client()
    devices = _strict(c.get("/api/devices").data)["devices"]
    a = next(d for d in devices if d["device_id"] == "dev-a")
    assert a["status"]["threshold"] is None and a["status"]["x"] == [None, 1.5] and a["offload_rate"] is None
    assert next(d for d in devices if d["device_id"] == "dev-b")["status"]["threshold"] == 0.5
    assert _strict(c.get("/api/devices/dev-a").data)["status"]["threshold"] is None


def test_parse_status_refuses_non_finite_and_oversized_and_cuts_long_strings():
    from cloud_gateway.telemetry_parser import MAX_STATUS_BYTES, MAX_STRING, StatusError, parse_status

    ok = parse_status(json.dumps({"schema": 1, "device_id": "d", "state": "online", "threshold": 0.7,
                                  "last_cmd": {"cmd": "bench", "ok": False, "error": "e" * 5000}}).encode(), "d")
    assert len(ok["last_cmd"]["error"]) == MAX_STRING and ok["last_cmd"]["error"].endswith("…")
    for bad, why in [({"threshold": math.nan}, "threshold"), ({"time": math.inf}, "time"),
                     ({"extra": {"deep": [math.nan]}}, "non-finite"), ({"device_id": "other"}, "does not match"),
                     ({"threshold": "high"}, "threshold"), ({"last_cmd": {"ok": "yes"}}, "last_cmd.ok"),
                     ({"pad": "x" * MAX_STATUS_BYTES}, "exceeds")]:
        with pytest.raises(StatusError, match=why):
            parse_status(json.dumps({"schema": 1, "device_id": "d", "state": "online", **bad}).encode(), "d")


@pytest.mark.broker
def test_a_device_cannot_store_a_huge_or_non_finite_status(mosquitto, tiny_cascade, tmp_path):
    with start_gateway(mosquitto, tiny_cascade, tmp_path) as gw:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev-a-raw", protocol=mqtt.MQTTv5)
        c.username_pw_set(*mosquitto.credentials("dev-a"))
        c.connect(mosquitto.host, mosquitto.port)
        c.loop_start()
        try:
            def status(**kw):  # type: ignore[no-untyped-def]
                body = json.dumps({"schema": 1, "device_id": "dev-a", "state": "online", **kw}).encode()
                c.publish("fleet/dev-a/status", body, qos=1, retain=True).wait_for_publish(5)

            status(version="good", threshold=0.5)
            wait_for(lambda: ((gw.store.devices.get("dev-a") or {}).get("status") or {}).get("version") == "good",
                     10, "the good status")
            invalid = lambda: gw.config.metrics.value("gateway_invalid_status_total", device="dev-a")  # noqa: E731
            status(version="huge", pad="x" * (3 << 20))
            wait_for(lambda: invalid() == 1, 10, "the huge one refused")  # (a status superseded before it is read
            status(version="nan", threshold=math.nan)  # is coalesced, never checked: wait for each)
            wait_for(lambda: invalid() == 2, 10, "the NaN one refused")
            status(version="last", last_cmd={"cmd": "bench", "ok": False, "error": "y" * 10_000})
            wait_for(lambda: gw.store.devices.get("dev-a")["status"].get("version") == "last", 10, "the last one")
        finally:
            c.loop_stop()
            c.disconnect()
        from cloud_gateway.telemetry_parser import MAX_STATUS_BYTES, MAX_STRING

        stored = gw.store.devices.get("dev-a")["status"]
        assert len(json.dumps(stored)) < MAX_STATUS_BYTES and len(stored["last_cmd"]["error"]) == MAX_STRING
        assert gw.config.metrics.value("gateway_invalid_status_total", device="dev-a") == 2
        import urllib.request

        with urllib.request.urlopen(f"{gw.http_url}/api/devices", timeout=10) as r:
            assert _strict(r.read())["devices"][0]["status"]["version"] == "last"


def _raw_device(broker, device: str):  # type: ignore[no-untyped-def]
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{device}-raw", protocol=mqtt.MQTTv5)
    c.username_pw_set(*broker.credentials(device))
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


@pytest.mark.broker
def test_one_devices_flood_of_statuses_and_windows_stays_within_its_quota(mosquitto, tiny_cascade, tmp_path):
    """Per-device ingest quotas: a device's status flood is coalesced (its latest status still lands, another
    device's at once) and its window flood is stored only up to its quota; the windows past it are not
    acknowledged, so an honest agent sends them again later, while another device's windows are stored."""
    from cloud_gateway.worker import TokenBuckets
    from tests.agent.tiny import Listener

    with start_gateway(mosquitto, tiny_cascade, tmp_path, http=False) as gw:
        gw.worker.ingest.windows = TokenBuckets(1.0, 50)
        writes: list[str] = []
        real = gw.store.devices.set_statuses

        def counted(items, **kw):  # type: ignore[no-untyped-def]
            items = list(items)
            writes.extend(d for d, _ in items)
            return real(items, **kw)

        gw.store.devices.set_statuses = counted  # type: ignore[method-assign]
        acks = Listener(mosquitto, ["fleet/dev-a/telemetry/ack"], client_id="acks")
        a, b = _raw_device(mosquitto, "dev-a"), _raw_device(mosquitto, "dev-b")
        t0 = time.monotonic()
        try:
            sent = [a.publish("fleet/dev-a/status", json.dumps({"schema": 1, "state": "online", "version": str(i)}),
                              qos=1, retain=True) for i in range(300)]
            sent += [a.publish("fleet/dev-a/telemetry", json.dumps({"schema": 1, "device_id": "dev-a", "boot": "b1",
                                                                   "seq": i, "counts": {"inputs": 1}}), qos=1)
                     for i in range(300)]
            for info in sent:  # every one reached the broker
                info.wait_for_publish(10)
            b.publish("fleet/dev-b/status", json.dumps({"schema": 1, "state": "online", "version": "b"}),
                      qos=1).wait_for_publish(5)
            for i in range(5):
                b.publish("fleet/dev-b/telemetry", json.dumps({"schema": 1, "device_id": "dev-b", "boot": "b2",
                                                              "seq": i, "counts": {"inputs": 1}}),
                          qos=1).wait_for_publish(5)
            wait_for(lambda: len(gw.store.telemetry.arrival_order("dev-b")) == 5, 10, "dev-b's 5 windows")
            wait_for(lambda: ((gw.store.devices.get("dev-b") or {}).get("status") or {}).get("version") == "b",
                     5, "dev-b's status")
            wait_for(lambda: gw.store.devices.get("dev-a")["status"]["version"] == "299", 10, "dev-a's latest status")
        finally:
            for c in (a, b):
                c.loop_stop()
                c.disconnect()
        elapsed = time.monotonic() - t0
        wait_for(lambda: len(gw.store.telemetry.arrival_order("dev-a")) >= 50, 10, "dev-a's burst of windows")
        stored = len(gw.store.telemetry.arrival_order("dev-a"))
        assert 50 <= stored <= 52 + elapsed  # its burst, and what the refill (1 a second) brought meanwhile
        wait_for(lambda: len(acks.messages) >= stored, 5, "the acknowledgements")
        time.sleep(0.3)
        assert len(acks.messages) == stored  # a window past the quota is not acknowledged: it will come again
        assert writes.count("dev-a") <= 22 + 2 * (time.monotonic() - t0)  # 300 statuses, coalesced
        m = gw.config.metrics
        assert m.value("gateway_device_quota_refused_total", device="dev-a", kind="telemetry") > 0
        assert m.value("gateway_device_quota_refused_total", device="dev-a", kind="status") \
            + m.value("gateway_status_coalesced_total") > 0  # 300 statuses: coalesced on arrival or by the quota
        assert m.value("gateway_device_quota_refused_total", device="dev-b", kind="telemetry") == 0
        assert m.value("gateway_device_quota_refused_total", device="dev-b", kind="status") == 0
        acks.stop()
