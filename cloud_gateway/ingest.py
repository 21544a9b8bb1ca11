"""Telemetry and status ingest: the MQTT callbacks only enqueue; one thread decodes and writes in batches.

At fleet scale (thousands of devices, a window each every few seconds) one commit per message on the MQTT
network thread fell behind: the broker's queue for the gateway filled and it dropped windows it had already
acknowledged to the devices. Here the network thread does only what keeps one device from crowding out the
others (its quota, a dict lookup) and hands the raw payload over:

- **Telemetry** goes into a bounded queue. The ingest thread takes what is queued (up to ``ingest_batch``),
  checks each window (`parse_window`), stores the batch in one transaction (`WindowStore.add_many`) and only
  then acknowledges each window on ``<prefix>/<id>/telemetry/ack``. A window the store failed on is not
  acknowledged: its agent sends it again (docs/agent.md, "Outbox").
- **Back-pressure, never a silent drop.** When the queue is full the network thread waits for room (up to
  ``ingest_block_s``; meanwhile it reads nothing, so the broker holds the rest in its queue for the gateway:
  size it, docs/gateway.md "Fleet scale"). Counted in ``gateway_ingest_backpressure_total``. A window that still
  finds no room is refused: not stored, not acknowledged, counted in ``gateway_ingest_refused_total``; its agent
  sends it again.
- **Statuses** are coalesced per device: the latest raw status of each device waits in a dict (a status
  supersedes the one before, so nothing a reader would see is lost; bounded by the number of devices) and the
  ingest thread upserts them in one statement per batch, each device within its status quota.
- **Retention**: raw windows whose ``t_end`` is older than ``telemetry_retention_days`` are deleted by the same
  thread, a few thousand rows per transaction, between batches.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any, Callable

from edgecore import wire

from .config import WorkerConfig
from .metrics import Metrics
from .store import GatewayStore
from .telemetry_parser import parse_status, parse_window

log = logging.getLogger(__name__)

INGEST_BATCH_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096)


class TokenBuckets:
    """One token bucket per key: ``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = float(rate), float(burst)
        self._b: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
        self._lock = threading.Lock()

    def take(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, then = self._b.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            ok = tokens >= 1.0
            self._b[key] = (tokens - 1.0 if ok else tokens, now)
            return ok


class Ingest:
    """The ingest queue and the thread that drains it into the store. ``publish(topic, payload)`` sends the
    acknowledgements (the ingest connection's)."""

    def __init__(self, *, config: WorkerConfig, store: GatewayStore | None, metrics: Metrics,
                 publish: Callable[[str, bytes], Any], collector: Any = None) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.publish = publish
        self.collector = collector
        self.windows = TokenBuckets(config.telemetry_per_s, config.telemetry_burst)  # per-device window quota
        self.statuses = TokenBuckets(config.status_per_s, config.status_burst)  # per-device status quota
        self._q: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=config.ingest_queue)
        self._status_lock = threading.Lock()
        self._status_raw: dict[str, bytes] = {}  # the latest status of each device, not yet read
        self._status_held: dict[str, dict[str, Any]] = {}  # read, waiting for its device's quota (or a retry)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gateway-ingest", daemon=True)
        self._next_sweep = time.monotonic() + 5.0
        self.batches = 0  # batches written (tests)

    # --- the network thread's side ------------------------------------------------
    def offer_window(self, device_id: str, payload: bytes) -> None:
        if not self.windows.take(device_id):  # past its quota: not stored, not acknowledged: sent again later
            self.metrics.inc("gateway_device_quota_refused_total", "Messages refused past their device's quota",
                             device=device_id, kind="telemetry")
            return
        try:
            self._q.put_nowait((device_id, payload))
            return
        except queue.Full:
            pass
        self.metrics.inc("gateway_ingest_backpressure_total",
                         "Times the ingest queue was full and the MQTT thread waited for room (the broker queues)",
                         kind="telemetry")
        try:
            self._q.put((device_id, payload), timeout=self.config.ingest_block_s)
        except queue.Full:
            self.metrics.inc("gateway_ingest_refused_total",
                             "Windows refused with the ingest queue full: not stored, not acknowledged (resent)",
                             kind="telemetry")
            log.warning("ingest queue full (%d) for %.1f s: a window of %s refused, its agent sends it again",
                        self.config.ingest_queue, self.config.ingest_block_s, device_id)

    def offer_status(self, device_id: str, payload: bytes) -> None:
        if not payload:
            return
        with self._status_lock:
            if device_id in self._status_raw:
                self.metrics.inc("gateway_status_coalesced_total",
                                 "Statuses superseded by a newer one of the same device before they were read")
            self._status_raw[device_id] = payload

    # --- lifecycle ------------------------------------------------------------------
    def start(self) -> "Ingest":
        self._thread.start()
        return self

    def stop(self, *, drain_s: float = 5.0) -> None:
        """Write (and acknowledge) what is queued, up to ``drain_s``, then stop."""
        end = time.monotonic() + drain_s
        while (self._q.qsize() or self._status_raw) and self._thread.is_alive() and time.monotonic() < end:
            time.sleep(0.01)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=max(1.0, end - time.monotonic()))

    @property
    def depth(self) -> int:
        return self._q.qsize()

    # --- the ingest thread ------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                batch = [self._q.get(timeout=0.05)]
            except queue.Empty:
                batch = []
            while batch and len(batch) < self.config.ingest_batch:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(batch)
            except Exception:  # never let one batch kill the thread
                log.exception("ingest batch of %d failed", len(batch))
                self.metrics.inc("gateway_internal_errors_total", "Unexpected errors while handling a message")
            if self.config.telemetry_retention_days > 0 and time.monotonic() >= self._next_sweep:
                self._sweep()

    def _write(self, batch: list[tuple[str, bytes]]) -> None:
        with self._status_lock:
            raw, self._status_raw = self._status_raw, {}
        statuses = self._read_statuses(raw)
        windows: list[tuple[str, dict[str, Any]]] = []
        for device_id, payload in batch:
            try:
                windows.append((device_id, parse_window(payload, device_id)))
            except wire.WireError as e:
                self.metrics.inc("gateway_invalid_telemetry_total", "Telemetry windows refused (not stored)",
                                 device=device_id)
                log.warning("telemetry window from %s refused: %s", device_id, e)
                self._ack(device_id, _readable(payload), f"refused: {e}")
        if not windows and not statuses:
            self.metrics.set("gateway_ingest_queue_depth", "Messages waiting in the ingest queue", self._q.qsize())
            return
        t0 = time.perf_counter()
        try:
            new = self.store.telemetry.add_many(windows) if self.store else [True] * len(windows)
            if self.store and statuses:
                self.store.devices.set_statuses(statuses.items())
        except Exception:  # not stored, not acknowledged: the agents send the windows again
            log.exception("storing a batch of %d windows and %d statuses failed", len(windows), len(statuses))
            self.metrics.inc("gateway_ingest_store_errors_total", "Ingest batches the store failed on (not acked)")
            with self._status_lock:  # retried with the next batch, unless a newer one came meanwhile
                for d, st in statuses.items():
                    self._status_held.setdefault(d, st)
            return
        self.batches += 1
        m = self.metrics
        m.observe("gateway_ingest_batch_size", "Telemetry windows and statuses per ingest transaction",
                  len(windows) + len(statuses), buckets=INGEST_BATCH_BUCKETS)
        m.observe("gateway_ingest_commit_seconds", "Time to store one ingest batch", time.perf_counter() - t0)
        m.set("gateway_ingest_queue_depth", "Messages waiting in the ingest queue", self._q.qsize())
        for d, msg in statuses.items():
            m.note_line(d, msg.get("model") if isinstance(msg.get("model"), str) else None)
            if self.collector is not None:
                self.collector.note_status(d, msg)
        for (device_id, msg), is_new in zip(windows, new):
            self._ack(device_id, msg, None)  # stored now (or before: a redelivery, acknowledged again)
            m.inc("gateway_telemetry_windows_total", "Telemetry windows stored", device=device_id)
            if self.collector is not None:
                self.collector.note_telemetry(device_id, msg)
            if not is_new:
                m.inc("gateway_telemetry_duplicates_total", "Redelivered windows dropped", device=device_id)
                continue
            if m.per_device:
                self._device_gauges(device_id, msg)

    def _read_statuses(self, raw: dict[str, bytes]) -> dict[str, dict[str, Any]]:
        """The statuses to store now: each device's newest valid one, within its quota; the rest wait."""
        with self._status_lock:
            held, self._status_held = self._status_held, {}
        for device_id, payload in raw.items():
            try:
                msg = parse_status(payload, device_id)
            except wire.WireError as e:  # too big, a NaN, a mistyped field: the last good status stays
                self.metrics.inc("gateway_invalid_status_total", "Device statuses refused (not stored)",
                                 device=device_id)
                log.warning("status from %s refused: %s", device_id, e)
                continue
            if device_id in held:
                self.metrics.inc("gateway_device_quota_refused_total", "Messages refused past their device's quota",
                                 device=device_id, kind="status")
            held[device_id] = msg
        due: dict[str, dict[str, Any]] = {}
        for device_id, msg in held.items():
            if self.statuses.take(device_id):
                due[device_id] = msg
            else:  # stored when the device has a token again: the latest lands
                with self._status_lock:
                    self._status_held.setdefault(device_id, msg)
        return due

    def _ack(self, device_id: str, msg: dict[str, Any], error: str | None) -> None:
        """Tell the agent its window is stored (or refused for good: it would never be stored), so that it
        deletes it from its outbox; a window not acknowledged (the store failed) is sent again."""
        boot, seq = msg.get("boot"), msg.get("seq")
        if not isinstance(boot, str) or isinstance(seq, bool) or not isinstance(seq, int):
            return
        body: dict[str, Any] = {"boot": boot[:32], "seq": seq, "ok": error is None}
        if error is not None:
            body["error"] = error[:200]
        try:
            self.publish(wire.Topics.of(self.config.prefix, device_id, wire.Topics.TELEMETRY_ACK), wire.dumps(body))
        except Exception as e:  # the link is down: the agent sends the window again, and it is acked then
            log.warning("acknowledging a window of %s failed: %s", device_id, e)

    def _device_gauges(self, device_id: str, msg: dict[str, Any]) -> None:
        m = self.metrics
        m.set("device_offload_rate", "Offload rate of the last window", msg.get("offload_rate", 0.0), device=device_id)
        m.set("device_fallback_rate", "Fallback rate of the last window", msg.get("fallback_rate", 0.0),
              device=device_id)
        drift = msg.get("drift") or {}
        if drift:
            m.set("device_drift_flag", "1 when the device's drift tests flag", float(bool(drift.get("flag"))),
                  device=device_id)
            conf = drift.get("confidence") or {}
            if "psi" in conf:
                m.set("device_drift_psi", "PSI of the confidence vs the reference", conf["psi"], device=device_id)

    def _sweep(self) -> None:
        """Delete one chunk of windows past the retention; the next chunk after the next idle moment."""
        if self.store is None:
            return
        limit = 5000
        cutoff = time.time() - self.config.telemetry_retention_days * 86400.0
        try:
            n = self.store.telemetry.delete_before(cutoff, limit=limit)
        except Exception:
            log.exception("deleting telemetry past the retention failed")
            n = 0
        if n:
            self.metrics.inc("gateway_telemetry_expired_total", "Telemetry windows deleted past the retention", n)
        self._next_sweep = time.monotonic() + (0.0 if n >= limit else self.config.retention_sweep_s)


def _readable(payload: bytes) -> dict[str, Any]:
    """A refused window's (boot, seq) as far as they can be read."""
    try:
        raw = json.loads(payload)
    except (ValueError, RecursionError):
        return {}
    return raw if isinstance(raw, dict) else {}

