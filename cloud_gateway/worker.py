"""MQTT workers: shared-subscription requests, micro-batching, replies; telemetry and statuses go to `ingest`.

Several replicas subscribe to ``$share/gateways/<prefix>/+/infer/req`` and the
broker splits requests between them. The network thread batches by itself: a
request followed on the socket by another PUBLISH (more requests, already
arrived) is held; the first one with nothing behind it releases what is held
as one batch (at most ``batch_size``), run right there when the model is free,
because a hand-off to another thread costs more than a small teacher. While a
batch runs, requests queue for the batcher thread, which takes what is queued
and waits up to ``batch_ms`` for more only while more keeps arriving. One
model call per batch; each request is answered on its response topic with its
correlation data. A bad request is answered with an error reply where
possible, counted, logged, and the worker goes on.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecore import wire
from edgecore.errors import BrokerError, GatewayError
from edgecore.mqtt import MqttLink

from .collection import SampleCollector
from .config import WorkerConfig
from .ingest import Ingest, TokenBuckets  # noqa: F401  (TokenBuckets: re-exported from its old home)
from .metrics import BATCH_BUCKETS, Metrics
from .store import GatewayStore
from .teacher import Teacher

log = logging.getLogger(__name__)


@dataclass
class _Request:
    device_id: str
    x: np.ndarray
    response_topic: str
    correlation: bytes | None
    received: float
    confidence: float | None = None  # the device model's (MQTT 5 user property ``conf``)
    collect: bool = False  # the collector wants this one (decided on arrival)
    flagged: bool = False  # the device asked for it to be collected (user property ``collect``)
    bundle: str = ""  # the bundle version the device answered with (user property ``bundle``)


class InvalidRequest(Exception):
    """A request the gateway answers with an error instead of a prediction."""


class GatewayWorker:
    def __init__(self, *, config: WorkerConfig, teacher: Teacher, store: GatewayStore | None,
                 metrics: Metrics, collector: "SampleCollector | None" = None) -> None:
        self.config = config
        self.collector = collector
        self.teacher = teacher
        self.task = teacher.task  # what the teacher's answers mean on the wire
        self.store = store
        self.metrics = metrics
        self._q: queue.Queue[_Request] = queue.Queue(maxsize=10000)
        self._model_lock = threading.Lock()  # one model call at a time: inline (network thread) or batched
        self._pending: list[_Request] = []  # requests the network thread holds for its next batch (its own)
        self._held: dict[str, int] = {}  # requests waiting per device (held, queued or in a batch being served)
        self._held_lock = threading.Lock()
        self._stop = threading.Event()
        self._unsubscribed = threading.Event()
        self.served = 0
        c = config
        # Two connections. Requests: a clean session that the broker forgets on disconnect, so a stopped
        # replica leaves the shared group at once instead of collecting requests it never answers
        # (docs/gateway.md, "Replicas"). Ingest: a persistent session, so telemetry published while every
        # replica is away is queued by the broker (agents' outboxes count a window sent at its PUBACK).
        try:
            self.link = self._link(f"gateway-{c.replica_id}", c.request_session_expiry_s)
            self.ingest_link = self._link(f"gateway-{c.replica_id}-ingest", c.session_expiry_s)
        except BrokerError as e:
            raise GatewayError(str(e)) from e
        self.v5 = self.link.v5
        T = wire.Topics
        share = c.ingest_group if self.v5 and c.ingest_group else None  # replicas split telemetry and statuses
        self.sub_req = T.pattern(c.prefix, T.REQ, share=c.group if self.v5 else None)
        self.sub_tel = T.pattern(c.prefix, T.TELEMETRY, share=share)
        self.sub_status = T.pattern(c.prefix, T.STATUS, share=share)
        self.client = self.link.client  # the request connection's paho client: its socket is peeked (batching)
        self.ingest = Ingest(config=c, store=store, metrics=metrics, collector=collector,
                             publish=lambda topic, payload: self.ingest_link.publish(topic, payload, qos=1))
        self.link.subscribe(self.sub_req, lambda m: self._on_message(self.client, None, m))
        self.link.on_disconnect(self._serve_held)
        self.ingest_link.subscribe(self.sub_tel, lambda m: self._on_message(None, None, m))
        self.ingest_link.subscribe(self.sub_status, lambda m: self._on_message(None, None, m))
        if share:  # a shared subscription is sent no retained message: read the retained statuses once a connect
            self.ingest_link.on_ready(self._status_snapshot)
        self.client.on_unsubscribe = lambda *a: self._unsubscribed.set()
        self.connected = self.link.connected
        self.ingest_connected = self.ingest_link.connected
        self._batcher = threading.Thread(target=self._batch_loop, name="gateway-batcher", daemon=True)

    def _status_snapshot(self) -> None:
        """Subscribe to every status unshared for ``status_snapshot_s`` after each connect, for the retained ones
        (statuses of devices that published before this replica came); a status read twice is stored once."""
        plain = wire.Topics.pattern(self.config.prefix, wire.Topics.STATUS)
        self.ingest_link.subscribe(plain, lambda m: self._on_message(None, None, m))
        t = threading.Timer(self.config.status_snapshot_s, self.ingest_link.unsubscribe, (plain,))
        t.daemon = True
        t.start()

    def _link(self, client_id: str, session_expiry_s: int) -> MqttLink:
        c = self.config
        link = MqttLink(url=c.broker_url, client_id=client_id, username=c.username, password=c.password,
                        keepalive=c.keepalive_s, mqtt_version=c.mqtt_version, session_expiry_s=session_expiry_s)
        link.on_ready(lambda: log.info("gateway %s connected", client_id))
        return link

    # --- lifecycle -------------------------------------------------------------
    def start(self, *, wait: float = 10.0) -> "GatewayWorker":
        # warm the model up before taking requests: a runtime's first call is slow (allocations,
        # kernel selection), and the first devices after a restart would pay it as timeouts
        self.teacher.run(np.zeros((1, *self.teacher.sample_shape), np.float32))
        try:
            self.ingest_link.start(wait=None)
            self.link.start(wait=None)
        except BrokerError as e:
            self.ingest_link.stop()
            raise GatewayError(f"gateway could not connect: {e}") from e
        self._batcher.start()
        self.ingest.start()
        if self.collector is not None:
            self.collector.start()
        end = time.monotonic() + wait
        if not (self.link.ready.wait(wait) and self.ingest_link.ready.wait(max(0.0, end - time.monotonic()))):
            why = self.link.last_error or self.ingest_link.last_error or "no answer"
            self.stop()
            raise GatewayError(f"gateway could not connect to {self.config.broker_url}: {why} (credentials? ACL?)")
        return self

    def stop(self, *, drain_s: float = 5.0) -> None:
        """Leave the shared group first, answer what was already queued, then disconnect."""
        if self.connected.is_set():
            try:
                self.link.unsubscribe(self.sub_req)
                self._unsubscribed.wait(2.0)
            except Exception as e:
                log.warning("unsubscribe on stop: %s", e)
        end = time.monotonic() + drain_s
        while self._q.unfinished_tasks and self._batcher.is_alive() and time.monotonic() < end:
            time.sleep(0.01)
        self._stop.set()
        if self.sub_tel.startswith("$share/") and self.ingest_connected.is_set():
            # leave the ingest group too: the broker would go on routing this replica's share of the windows to
            # its session while it is away (they are resent by their agents, unacknowledged, but late)
            for sub in (self.sub_tel, self.sub_status):
                try:
                    self.ingest_link.unsubscribe(sub)
                except Exception as e:
                    log.warning("unsubscribe on stop: %s", e)
        self.ingest.stop(drain_s=max(0.5, end - time.monotonic()))  # store and acknowledge what was queued
        for link in (self.link, self.ingest_link):
            link.stop()
        if self._batcher.is_alive():
            self._batcher.join(timeout=5)
        if self.collector is not None:
            self.collector.stop()

    # --- messages --------------------------------------------------------------
    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        """Every message of both connections; ``client``: the paho client it came on (its socket is peeked)."""
        parts = msg.topic.split("/")
        try:
            if len(parts) == 4 and parts[2:] == ["infer", "req"]:
                try:
                    self._on_request(parts[1], msg)
                finally:  # whatever became of this one, never strand the ones held before it
                    if self._pending and (len(self._pending) >= self.config.batch_size
                                          or not _next_is_publish(client)):
                        self._flush()
            elif len(parts) == 3 and parts[2] == "telemetry":
                self.ingest.offer_window(parts[1], msg.payload)  # decoded and stored by the ingest thread
            elif len(parts) == 3 and parts[2] == "status":
                self.ingest.offer_status(parts[1], msg.payload)
        except Exception:  # never let one message kill the network thread
            log.exception("failed handling %s", msg.topic)
            self.metrics.inc("gateway_internal_errors_total", "Unexpected errors while handling a message")

    def _on_request(self, device_id: str, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        resp = getattr(props, "ResponseTopic", None) if props else None
        corr = getattr(props, "CorrelationData", None) if props else None
        self.metrics.inc("gateway_requests_total", "Inference requests received", device=device_id)
        expected = wire.Topics.of(self.config.prefix, device_id, wire.Topics.RESP)
        try:
            try:
                env_corr, env_resp, payload = wire.decode_request(msg.payload)
            except wire.EnvelopeError as e:  # answer on whatever reply address it still carries
                corr, resp = corr or e.correlation, resp or e.response_topic
                raise
            corr, resp = corr or env_corr, resp or env_resp
            if not resp:
                raise InvalidRequest("no response topic")
            if resp != expected:
                resp_bad, resp = resp, None
                raise InvalidRequest(f"response topic {resp_bad!r} is not the device's own {expected!r}")
            x = self._validate(payload)
        except (InvalidRequest, wire.WireError) as e:
            self.metrics.inc("gateway_invalid_requests_total", "Requests rejected by validation", device=device_id)
            log.warning("invalid request from %s: %s", device_id, e)
            if resp == expected:  # never reply on another device's topic
                self._reply(resp, corr, {"ok": False, "error": str(e)})
            return
        if not self._hold(device_id):
            self.metrics.inc("gateway_device_quota_refused_total",
                             "Requests refused because their device had its share of the queue waiting",
                             device=device_id)
            self._reply(resp, corr, {"ok": False, "error": f"this device has {self.config.max_pending_per_device} "
                                                           "requests waiting, its share of the gateway; refused"})
            return
        conf, flagged, bundle = _user_properties(props)
        want = self.collector is not None and self.collector.wants(device_id, flagged)
        req = _Request(device_id, x, resp, corr, time.perf_counter(), conf, want, flagged, bundle)
        self._pending.append(req)  # _on_message serves it now, or with the requests right behind it

    def _hold(self, device_id: str) -> bool:
        """Count one more request of ``device_id`` waiting; False (nothing counted) past its share."""
        with self._held_lock:
            n = self._held.get(device_id, 0)
            if n >= self.config.max_pending_per_device:
                return False
            self._held[device_id] = n + 1
            return True

    def _release(self, batch: list[_Request]) -> None:
        with self._held_lock:
            for r in batch:
                n = self._held.get(r.device_id, 0) - 1
                if n > 0:
                    self._held[r.device_id] = n
                else:
                    self._held.pop(r.device_id, None)

    def _serve_held(self) -> None:
        """The request connection went: requests held for a batch are served now (on the network thread,
        their owner), not stranded until a reconnect that may never bring the requests behind them."""
        if self._pending:
            self._flush()

    def _flush(self) -> None:
        """Serve what the network thread holds: here, as one batch, when nothing is queued and the model is free
        (a hand-off to the batcher thread and back costs more than a small teacher); else queue it for the
        batcher (a batch is running)."""
        batch, self._pending = self._pending, []
        if self._q.empty() and self._model_lock.acquire(blocking=False):
            try:
                self._serve(batch)
            finally:
                self._model_lock.release()
            return
        for req in batch:
            try:
                self._q.put_nowait(req)
            except queue.Full:
                self._release([req])
                self.metrics.inc("gateway_overload_total", "Requests refused because the queue was full")
                self._reply(req.response_topic, req.correlation, {"ok": False, "error": "gateway overloaded"})

    def _validate(self, payload: bytes) -> np.ndarray:
        x = wire.decode_tensor(payload, max_bytes=self.config.max_payload_bytes)
        shape = self.teacher.sample_shape
        if x.dtype != np.float32:
            raise InvalidRequest(f"dtype {x.dtype} (expected float32)")
        if x.shape == shape:
            x = x[None]
        if x.shape != (1, *shape):
            raise InvalidRequest(f"shape {list(x.shape)} (expected [1, {', '.join(map(str, shape))}])")
        if not np.isfinite(x).all():
            raise InvalidRequest("non-finite values")
        return x

    def _reply(self, topic: str, corr: bytes | None, body: dict[str, Any]) -> None:
        if corr:
            body["correlation"] = corr.hex()  # for MQTT 3.1.1 clients; v5 ones use the property
        body.setdefault("server_time", time.time())
        body.setdefault("replica", self.config.replica_id)
        self.link.publish(topic, wire.dumps(body), qos=1, correlation=corr)

    def _answer(self, logits: np.ndarray, batch_size: int) -> dict[str, Any]:
        """The reply for one row of teacher output: a prediction, or an error when it is not finite.

        Finite logits give finite probabilities (every exp(z - max) is in [0, 1] and one is 1), so the
        logits are the only thing checked; the softmax stays in float32 (the probabilities are sent to 6 digits).
        """
        if not np.isfinite(logits).all():
            self.metrics.inc("gateway_nonfinite_outputs_total", "Requests whose teacher output was not finite")
            return {"ok": False, "error": "the teacher's output for this input is not finite "
                                          "(input out of the model's range?)"}
        return {"ok": True, **self.task.answer(logits, self.teacher.labels), "model_version": self.teacher.version,
                "batch_size": batch_size}

    # --- batching --------------------------------------------------------------
    def _batch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._q.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < self.config.batch_size:  # take what is already queued, without waiting
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            if len(batch) > 1:  # under load: wait up to batch_ms for more to fill the batch
                self._fill(batch, time.perf_counter() + self.config.batch_ms / 1000.0)
            try:
                with self._model_lock:
                    self._serve(batch)
            finally:
                for _ in batch:
                    self._q.task_done()

    def _fill(self, batch: list[_Request], until: float) -> None:
        """Add to the batch what the network thread is still reading: wait (up to ``until``) only while more
        requests are on the request socket; an idle socket means the batch is all there is."""
        while len(batch) < self.config.batch_size:
            try:
                batch.append(self._q.get_nowait())
                continue
            except queue.Empty:
                pass
            left = until - time.perf_counter()
            if left <= 0 or not _more_waiting(self.client):
                return
            try:
                batch.append(self._q.get(timeout=min(left, 0.0005)))
            except queue.Empty:
                continue

    def _serve(self, batch: list[_Request]) -> None:
        try:
            self._serve_batch(batch)
        finally:
            self._release(batch)

    def _serve_batch(self, batch: list[_Request]) -> None:
        self.metrics.observe("gateway_batch_size", "Requests per model call", len(batch), buckets=BATCH_BUCKETS)
        t0 = time.perf_counter()
        try:
            logits = self.teacher.run(batch[0].x if len(batch) == 1 else np.concatenate([r.x for r in batch]))
        except Exception as e:
            log.exception("teacher failed on a batch of %d", len(batch))
            self.metrics.inc("gateway_model_errors_total", "Batches the teacher failed on")
            for r in batch:
                self._reply(r.response_topic, r.correlation, {"ok": False, "error": f"model error: {e}"})
            return
        self.metrics.observe("gateway_model_seconds", "Teacher time per batch", time.perf_counter() - t0)
        for r, row in zip(batch, logits):
            answer = self._answer(row, len(batch))
            self._reply(r.response_topic, r.correlation, answer)
            if r.collect and answer["ok"] and self.collector is not None:
                self.collector.offer(r.device_id, r.x[0], answer, confidence=r.confidence,
                                     flagged=r.flagged, bundle=r.bundle)
            self.metrics.observe("gateway_request_seconds", "Time from request arrival to reply",
                                 time.perf_counter() - r.received, device=r.device_id)
        self.served += len(batch)
        self.metrics.inc("gateway_replies_total", "Predictions sent", float(len(batch)), replica=self.config.replica_id)


def _next_is_publish(client: Any) -> bool:
    """Whether the next MQTT packet waiting on the client's socket is a PUBLISH (another request).

    paho reads exactly one packet at a time, so the kernel's buffer starts at the next packet; its first
    byte's high nibble is the packet type (3: PUBLISH). Peeked, not read. On a TLS or websocket transport the
    plaintext cannot be peeked: False (each request is then served as it comes, or queued under load).
    """
    sock = client.socket() if client is not None else None
    if type(sock) is not socket.socket:
        return False
    try:
        b = sock.recv(1, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0))
    except OSError:  # nothing waiting (EAGAIN), or closed under us
        return False
    return len(b) == 1 and b[0] >> 4 == 3


def _more_waiting(client: Any) -> bool:
    """Whether more bytes (the next request, most likely) already wait on the client's socket.

    paho reads one packet at a time, so what has arrived and is not yet handled is in the kernel's socket
    buffer (or, with TLS, in the SSL object's). The batcher asks while it fills a batch. A PUBACK for one of
    our replies also counts: the batcher then waits a little longer (never past ``batch_ms``), nothing more.
    """
    sock = client.socket() if client is not None else None
    if sock is None:
        return False
    try:
        if getattr(sock, "pending", None) is not None and sock.pending() > 0:
            return True
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):  # closed under us: nothing more will arrive on it
        return False


def _user_properties(props: Any) -> tuple[float | None, bool, str]:
    """(confidence, flagged, bundle) from a request's MQTT 5 user properties; anything unreadable is ignored."""
    conf, flagged, bundle = None, False, ""
    for item in getattr(props, "UserProperty", None) or ():
        try:
            key, value = item
            if key == "conf":
                v = float(value)
                conf = v if 0.0 <= v <= 1.0 else None
            elif key == "collect":
                flagged = value == "1"
            elif key == "bundle" and isinstance(value, str):
                bundle = value[:128]
        except (TypeError, ValueError):
            continue
    return conf, flagged, bundle
