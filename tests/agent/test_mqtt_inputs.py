"""Inputs over MQTT never hold the agent's network thread: bounded per message, queued without waiting, refused
with an answer that says why. (A message of 2,500 inputs once blocked the network thread, which also carries the
cloud's replies and the keepalive, until the broker dropped the agent.)"""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from device_agent.sources import MqttInputSource
from edgecore import wire
from tests.agent.tiny import Listener, make_agent, wait_for


def _msg(x: np.ndarray, corr: bytes | None = None):  # type: ignore[no-untyped-def]
    return SimpleNamespace(payload=wire.encode_tensor(x.astype(np.float32)),
                           properties=SimpleNamespace(CorrelationData=corr, UserProperty=None))


def _push_returns_quickly(src: MqttInputSource, msg) -> None:  # type: ignore[no-untyped-def]
    t = threading.Thread(target=src.push_message, args=(msg,), daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(2.0)
    assert not t.is_alive(), "push blocked the network thread"
    assert time.monotonic() - t0 < 0.5


def test_a_huge_message_is_refused_with_an_answer_and_nothing_blocks_the_network_thread(tiny_cascade):
    spec = tiny_cascade.spec
    replies: list[dict] = []
    src = MqttInputSource("fleet/dev-a/input", spec, maxsize=10, reply=replies.append)
    x = tiny_cascade.x_test
    _push_returns_quickly(src, _msg(np.repeat(x[:1], 2500, axis=0), b"big"))  # nobody consumes meanwhile
    assert replies == [{"id": "big", "ok": False, "route": "refused",
                        "error": "a message of 2500 inputs; one message may carry at most 256"}]
    for i in range(3):  # 5 + 5 fit the queue of 10; the third batch is dropped, answered, and nothing waits
        _push_returns_quickly(src, _msg(x[5 * i: 5 * i + 5], f"b{i}".encode()))
    assert replies[-1]["id"] == "b2" and replies[-1]["error"].startswith("the agent is behind (10 inputs waiting)")
    _push_returns_quickly(src, _msg(np.zeros((3, 3), np.float32), b"odd"))
    assert replies[-1]["id"] == "odd" and "the bundle takes [1, 8, 8]" in replies[-1]["error"]
    assert src.counts() == {"rejected": 1, "refused": 1, "dropped": 5}
    src.close()
    got = list(src)
    assert [it.id for it in got] == [f"b{i}[{j}]" for i in range(2) for j in range(5)]
    assert np.array_equal(np.stack([it.raw for it in got]), x[:10].astype(np.float32))


@pytest.mark.broker
def test_a_running_agent_answers_a_huge_message_with_an_error_and_keeps_answering(mosquitto, tiny_cascade, tmp_path):
    run = tiny_cascade
    agent = make_agent(mosquitto, run.bundle_dir, "dev-a", tmp_path)
    src = agent.fleet.mqtt_source()
    answers: list[dict] = []
    watch = Listener(mosquitto, ["fleet/dev-a/answers", "fleet/dev-a/status"], client_id="watch")
    with agent:
        worker = threading.Thread(target=lambda: [agent.fleet.publish_answer(a) for a in agent.run(src)], daemon=True)
        worker.start()
        feeder = Listener(mosquitto, ["fleet/dev-a/answers"], client_id="feeder", creds=mosquitto.credentials("dev-a"))
        big = wire.encode_tensor(np.repeat(run.x_test[:1], 2500, axis=0).astype(np.float32))
        feeder.client.publish("fleet/dev-a/input", big, qos=1).wait_for_publish(5)
        feeder.client.publish("fleet/dev-a/input", wire.encode_tensor(run.x_test[0].astype(np.float32)),
                              qos=1).wait_for_publish(5)

        def got() -> list[dict]:
            answers[:] = [json.loads(p) for t, p in watch.messages if t.endswith("/answers")]
            return answers

        wait_for(lambda: len(got()) >= 2, 10, "an error answer and an answer")

        def status() -> dict:
            return [json.loads(p) for t, p in watch.messages if t.endswith("/status")][-1]

        wait_for(lambda: status().get("inputs", {}).get("refused") == 1, 10, "the refusal in the status")
        feeder.stop()
        src.close()
        worker.join(10)
    watch.stop()
    refused = [a for a in answers if a.get("ok") is False]
    assert len(refused) == 1 and "2500 inputs" in refused[0]["error"]
    assert [a["route"] for a in answers if a.get("ok") is not False] in (["edge"], ["cloud"], ["fallback"])
