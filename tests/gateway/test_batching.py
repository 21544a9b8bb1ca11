"""The worker's adaptive batching, without a broker: a request is answered at once when nothing else waits,
held while more requests are right behind it on the socket (then served as one batch), queued for the
batcher while a batch runs."""

from __future__ import annotations

import queue
import socket
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_gateway.config import WorkerConfig
from cloud_gateway.metrics import Metrics
from cloud_gateway.teacher import Teacher
from cloud_gateway.worker import GatewayWorker, _more_waiting, _next_is_publish
from edgecore import wire

PUBLISH, PUBACK = b"\x30\x05", b"\x40\x02"  # first bytes of an MQTT PUBLISH and PUBACK packet


class _FakeClient:
    """What ``_on_message`` sees of paho's client: its socket."""

    def __init__(self, sock: socket.socket | None) -> None:
        self._sock = sock

    def socket(self) -> socket.socket | None:
        return self._sock


@pytest.fixture()
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)  # as paho's
    yield a, b
    a.close()
    b.close()


def _worker(batch_size: int = 32, batch_ms: float = 3000):
    calls: list[int] = []

    def run(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return np.tile(np.arange(10, dtype=np.float32), (len(batch), 1))

    teacher = Teacher(name="t", version="v1", sample_shape=(1, 8, 8), labels=[str(i) for i in range(10)], _run=run)
    w = GatewayWorker(config=WorkerConfig(broker_url="mqtt://127.0.0.1:1", batch_size=batch_size, batch_ms=batch_ms),
                      teacher=teacher, store=None, metrics=Metrics())
    sent: list[dict] = []
    w.client.publish = lambda topic, payload, **kw: sent.append({"topic": topic, **wire.loads(payload)})  # type: ignore[method-assign]
    w.client.socket = lambda: None  # type: ignore[method-assign]  # the batcher's view of the request socket
    return w, sent, calls


@pytest.fixture()
def worker():
    w, sent, calls = _worker()
    yield w, sent, calls
    w._stop.set()
    if w._batcher.is_alive():
        w._batcher.join(2)


def _msg(device: str, corr: bytes, *, shape: tuple[int, ...] = (1, 1, 8, 8)) -> mqtt.MQTTMessage:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = f"fleet/{device}/infer/resp"
    props.CorrelationData = corr
    m = mqtt.MQTTMessage(topic=f"fleet/{device}/infer/req".encode())
    m.payload = wire.encode_tensor(np.zeros(shape, np.float32))
    m.properties = props
    return m


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        pass


def test_peeking_at_the_socket_reads_nothing(pair):
    a, b = pair
    assert not _next_is_publish(_FakeClient(a)) and not _more_waiting(_FakeClient(a))
    b.sendall(PUBACK)
    assert not _next_is_publish(_FakeClient(a)) and _more_waiting(_FakeClient(a))
    _drain(a)
    b.sendall(PUBLISH)
    assert _next_is_publish(_FakeClient(a)) and _next_is_publish(_FakeClient(a))  # peeked, not consumed
    assert a.recv(2) == PUBLISH and not _next_is_publish(_FakeClient(a))
    assert not _next_is_publish(None) and not _next_is_publish(_FakeClient(None)) and not _more_waiting(None)


def test_a_burst_is_one_batch_and_a_lone_request_is_answered_at_once(worker, pair):
    w, sent, calls = worker
    a, b = pair
    c = _FakeClient(a)
    w._on_message(c, None, _msg("dev-a", b"c0"))  # nothing behind it: answered at once, a batch of one
    assert calls == [1] and sent[0]["topic"] == "fleet/dev-a/infer/resp" and sent[0]["batch_size"] == 1
    b.sendall(PUBLISH)  # another request right behind each of the next four: held
    for i in range(1, 5):
        w._on_message(c, None, _msg("dev-b", b"c%d" % i))
    assert calls == [1] and len(sent) == 1
    # a request that fails validation is answered with its error; the held ones stay held while more follow
    w._on_message(c, None, _msg("dev-b", b"bad", shape=(1, 1, 4, 4)))
    assert len(sent) == 2 and sent[1]["ok"] is False and "shape" in sent[1]["error"] and calls == [1]
    _drain(a)
    b.sendall(PUBACK)  # what follows is not a request: the held four and this one go as one batch
    w._on_message(c, None, _msg("dev-b", b"c5"))
    assert calls == [1, 5]
    good = [s for s in sent if s["ok"]]
    assert [s["batch_size"] for s in good[1:]] == [5] * 5 and all(s["prediction"] == 9 for s in good)
    assert sorted(s["correlation"] for s in good[1:]) == sorted((b"c%d" % i).hex() for i in range(1, 6))
    assert w.metrics.hist_count("gateway_batch_size") == 2 and w._pending == []


def test_held_requests_never_exceed_the_batch_size(pair):
    w, sent, calls = _worker(batch_size=3)
    a, b = pair
    b.sendall(PUBLISH)
    for i in range(7):
        w._on_message(_FakeClient(a), None, _msg("dev-a", b"%d" % i))
    assert calls == [3, 3] and len(w._pending) == 1
    w.client.on_disconnect(w.client, None, None, 0, None)  # the connection goes: what is held is served, not stranded
    assert calls == [3, 3, 1] and len(sent) == 7 and w._pending == []


def test_while_a_batch_runs_requests_queue_for_the_batcher(worker, pair):
    w, sent, calls = worker
    a, _ = pair
    with w._model_lock:  # a batch is running
        for i in range(4):
            w._on_message(_FakeClient(a), None, _msg("dev-a", b"%d" % i))
        assert calls == [] and w._q.qsize() == 4
        t0 = time.monotonic()
        w._batcher.start()
        time.sleep(0.05)
        assert calls == []  # waits for the model
    deadline = t0 + 5
    while len(sent) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    # drained in one model call; the request socket idle, it did not wait out batch_ms (3 s)
    assert calls == [4] and [s["batch_size"] for s in sent] == [4] * 4
    assert time.monotonic() - t0 < 2.0


def test_overload_is_answered_not_dropped(pair):
    w, sent, calls = _worker()
    w._q = queue.Queue(maxsize=2)
    a, _ = pair
    with w._model_lock:
        for i in range(3):
            w._on_message(_FakeClient(a), None, _msg("dev-a", b"%d" % i))
    assert w._q.qsize() == 2 and len(sent) == 1 and sent[0]["error"] == "gateway overloaded"
    assert w.metrics.value("gateway_overload_total") == 1


def test_one_devices_flood_never_fills_the_queue_for_the_others(worker):
    """Requests wait in one queue while the teacher is busy; a device may hold only its share of it (1000 of
    10000): past that its own are refused, and another device's request still gets in and is answered. (A flood
    of 10,050 filled the queue and the other devices got ``gateway overloaded``.)"""
    w, sent, calls = worker
    c = _FakeClient(None)
    w._model_lock.acquire()  # the teacher is busy: everything queues
    try:
        for i in range(10_050):
            w._on_message(c, None, _msg("dev-a", b"f%d" % i))
        w._on_message(c, None, _msg("dev-b", b"victim"))
        refused = [m for m in sent if not m["ok"]]
        assert len(refused) == 10_050 - 1000 and all(m["topic"] == "fleet/dev-a/infer/resp" for m in refused)
        assert refused[0]["error"] == "this device has 1000 requests waiting, its share of the gateway; refused"
    finally:
        w._model_lock.release()
    w._batcher.start()
    wait = time.monotonic() + 20
    while w.served < 1001 and time.monotonic() < wait:
        time.sleep(0.02)
    victim = [m for m in sent if m["topic"] == "fleet/dev-b/infer/resp"]
    assert len(victim) == 1 and victim[0]["ok"] and w.served == 1001
    assert w._held == {}  # every share given back once served
    w._on_message(c, None, _msg("dev-a", b"after"))  # the flooder is served again once its own went through
    wait = time.monotonic() + 5
    while w.served < 1002 and time.monotonic() < wait:
        time.sleep(0.02)
    assert sent[-1]["topic"] == "fleet/dev-a/infer/resp" and sent[-1]["ok"]
