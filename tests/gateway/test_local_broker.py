"""The product's local brokers: Mosquitto when installed, else amqtt (MQTT 3.1.1).

The amqtt path is what `toolchain demo` uses on a machine without Mosquitto, so
it gets the same security checks as the Mosquitto fixture: passwords, and a
device confined to its own topics; and the cascade must work through it.
"""

from __future__ import annotations

import threading
import time
import warnings

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud_gateway.broker import (
    AmqttBroker,
    MosquittoBroker,
    find_mosquitto,
    start_local_broker,
)
from device_agent.agent import summarize
from edgecore.errors import GatewayError
from tests.agent.tiny import items, make_agent, start_gateway
from tests.fixtures.broker import CredentialsMixin, known_credentials

pytestmark = pytest.mark.broker


class _TestAmqtt(CredentialsMixin, AmqttBroker):
    pass


@pytest.fixture
def amqtt_broker(tmp_path):
    warnings.simplefilter("ignore", DeprecationWarning)
    b = _TestAmqtt(tmp_path / "amqtt", known_credentials())
    b.start()
    yield b
    b.stop()


def _connect(broker, user: str, password: str, received: list) -> tuple[mqtt.Client, list[str]]:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"{user}-{password[:4]}",
                    protocol=mqtt.MQTTv311)
    c.username_pw_set(user, password)
    codes: list[str] = []
    ready = threading.Event()

    def on_connect(client, userdata, flags, reason, props):
        codes.append(str(reason))
        ready.set()

    c.on_connect = on_connect
    c.on_message = lambda client, userdata, msg: received.append((user, msg.topic, msg.payload))
    c.connect(broker.host, broker.port)
    c.loop_start()
    ready.wait(5)
    return c, codes


def test_amqtt_refuses_bad_passwords_and_confines_devices(amqtt_broker):
    got: list = []
    gw, gw_codes = _connect(amqtt_broker, *amqtt_broker.gateway_credentials, got)
    gw.subscribe("fleet/+/telemetry", qos=1)
    gw.subscribe("fleet/+/cmd", qos=1)
    dev, dev_codes = _connect(amqtt_broker, *amqtt_broker.credentials("dev-a"), got)
    bad, bad_codes = _connect(amqtt_broker, "dev-a", "wrong-password", [])
    try:
        assert gw_codes == ["Success"] and dev_codes == ["Success"]
        assert bad_codes and bad_codes[0] == "Not authorized"
        time.sleep(0.3)
        dev.publish("fleet/dev-a/telemetry", b"mine", qos=1).wait_for_publish(5)
        dev.publish("fleet/dev-b/telemetry", b"spoofed", qos=1)
        dev.publish("fleet/dev-a/cmd", b'{"cmd": "update_bundle"}', qos=1)  # its own command topic: refused
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not got:
            time.sleep(0.05)
        time.sleep(0.5)  # give a spoofed message the time to arrive, if it were let through
        assert [(u, t, p) for u, t, p in got] == [("gateway", "fleet/dev-a/telemetry", b"mine")]
    finally:
        for c in (gw, dev, bad):
            c.loop_stop()
            c.disconnect()


def test_cascade_through_amqtt_in_mqtt_311(amqtt_broker, tiny_cascade, tmp_path):
    run = tiny_cascade
    assert amqtt_broker.mqtt_version == "3.1.1"
    with start_gateway(amqtt_broker, run, tmp_path, http=False, mqtt_version="3.1.1"):
        with make_agent(amqtt_broker, run.bundle_dir, "dev-a", tmp_path, threshold=1.01, deadline_s=2.0,
                        mqtt_version="3.1.1") as agent:
            s = summarize(list(agent.run(items(run.x_test[:20], run.y_test[:20]))))
    assert s["cloud"] == 20 and s["fallback"] == 0  # every input answered by the gateway's teacher


def test_start_local_broker_picks_mosquitto_when_installed(tmp_path):
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    b = start_local_broker(tmp_path / "b", known_credentials(), prefer="auto")
    try:
        assert isinstance(b, MosquittoBroker) and b.mqtt_version == "5" and b.running
    finally:
        b.stop()
    assert not b.running


def test_start_local_broker_rejects_an_unknown_kind(tmp_path):
    with pytest.raises(GatewayError, match="unknown broker 'rabbit'"):
        start_local_broker(tmp_path, known_credentials(), prefer="rabbit")
