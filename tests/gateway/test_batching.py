"""The worker's adaptive batching, without a broker: inline when idle, queued and batched when more waits."""

from __future__ import annotations

import socket
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_gateway.metrics import Metrics
from cloud_gateway.model import Teacher
from cloud_gateway.worker import GatewayWorker, WorkerConfig, _more_waiting
from edgecore import wire


class _FakeClient:
    """What ``_on_message`` sees of paho's client: its socket."""

    def __init__(self, sock: socket.socket | None) -> None:
        self._sock = sock

    def socket(self) -> socket.socket | None:
        return self._sock


@pytest.fixture()
def worker():
    calls: list[int] = []

    def run(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return np.tile(np.arange(10, dtype=np.float32), (len(batch), 1))

    teacher = Teacher(name="t", version="v1", sample_shape=(1, 8, 8), labels=[str(i) for i in range(10)], _run=run)
    w = GatewayWorker(config=WorkerConfig(broker_url="mqtt://127.0.0.1:1", batch_ms=3000), teacher=teacher,
                      store=None, metrics=Metrics())
    sent: list[tuple[str, dict]] = []
    w.client.publish = lambda topic, payload, **kw: sent.append((topic, wire.loads(payload)))  # type: ignore[method-assign]
    w.client.socket = lambda: None  # type: ignore[method-assign]  # the batcher's view of the request socket
    yield w, sent, calls
    w._stop.set()
    if w._batcher.is_alive():
        w._batcher.join(2)


def _msg(device: str, corr: bytes) -> mqtt.MQTTMessage:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = f"fleet/{device}/infer/resp"
    props.CorrelationData = corr
    m = mqtt.MQTTMessage(topic=f"fleet/{device}/infer/req".encode())
    m.payload = wire.encode_tensor(np.zeros((1, 1, 8, 8), np.float32))
    m.properties = props
    return m


def test_more_waiting_reads_the_socket_without_consuming_it():
    a, b = socket.socketpair()
    try:
        assert not _more_waiting(_FakeClient(a))
        b.sendall(b"\x30\x00")
        assert _more_waiting(_FakeClient(a)) and _more_waiting(_FakeClient(a))  # peeked, not read
        assert a.recv(2) == b"\x30\x00" and not _more_waiting(_FakeClient(a))
        assert not _more_waiting(None) and not _more_waiting(_FakeClient(None))
    finally:
        a.close()
        b.close()
    assert not _more_waiting(_FakeClient(a))  # closed: no error, nothing waiting


def test_idle_socket_answers_inline_and_a_burst_is_batched(worker):
    w, sent, calls = worker
    idle_a, idle_b = socket.socketpair()
    busy_a, busy_b = socket.socketpair()
    busy_b.sendall(b"more requests")
    try:
        # nothing else waiting: answered at once on the calling (network) thread, a batch of one
        w._on_message(_FakeClient(idle_a), None, _msg("dev-a", b"c0"))
        assert calls == [1] and sent[0][0] == "fleet/dev-a/infer/resp" and sent[0][1]["batch_size"] == 1
        # more bytes already on the socket: queued for the batcher, not answered here
        for i in range(5):
            w._on_message(_FakeClient(busy_a), None, _msg("dev-b", b"c%d" % (i + 1)))
        assert len(sent) == 1 and w._q.qsize() == 5
        t0 = time.monotonic()
        w._batcher.start()
        deadline = t0 + 5
        while len(sent) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        # the batcher drains what is queued in one model call and, the socket idle, does not wait out batch_ms
        assert calls == [1, 5], calls
        assert time.monotonic() - t0 < 2.0  # batch_ms is 3 s: waited only while more was arriving
        assert [s[1]["batch_size"] for s in sent[1:]] == [5] * 5
        assert sorted(s[1]["correlation"] for s in sent[1:]) == [(b"c%d" % i).hex() for i in range(1, 6)]
        assert all(s[1]["ok"] and s[1]["prediction"] == 9 for s in sent)
        assert w.metrics.hist_count("gateway_batch_size") == 2
    finally:
        for s in (idle_a, idle_b, busy_a, busy_b):
            s.close()
