"""Collection of offloaded inputs with the teacher's answer: opt-in, sampled, bounded, off the request path.

What is stored, per collected request (docs/gateway.md, "Collected samples"):
the input tensor exactly as the device sent it, the teacher's probabilities and
top class, the device id, the bundle version the device reported in its status,
the device model's confidence and whether the device flagged the input (MQTT 5
user properties ``conf`` and ``collect``), the device's drift flag from its last
telemetry window, and the time. Nothing else (no IP address, no user name).

Collection is off unless ``--collect`` names devices (or ``all``). A request is
collected when its device is named and either the device flagged it or a
``rate`` draw accepts it. The reply never waits for the database: rows go to a
bounded queue (dropped and counted when full, and when a device holds its share of
it: one device's burst never drops another's rows) that one writer thread inserts in
batches, enforcing the bounds (retention, per device, total by fair share; a person's
labels are kept for other devices' volume: `SampleStore.trim`).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from edgecore import wire
from edgecore.tasks import Task, get_task

from .config import CollectionPolicy
from .metrics import Metrics
from .store import GatewayStore

log = logging.getLogger(__name__)


@dataclass
class SampleCollector:
    store: GatewayStore
    policy: CollectionPolicy
    metrics: Metrics
    queue_size: int = 2048
    batch: int = 64
    trim_every_s: float = 5.0
    seed: int | None = None
    task: Task = field(default_factory=get_task)  # reads the teacher's answers (`Task.teacher_record`)
    per_device_share: int = 0  # rows one device may have queued (0: an eighth of the queue)
    _q: "queue.Queue[dict[str, Any]]" = field(init=False)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _rng: random.Random = field(init=False)
    device_state: dict[str, dict[str, Any]] = field(default_factory=dict)  # bundle, drift per device

    def __post_init__(self) -> None:
        self._q = queue.Queue(maxsize=self.queue_size)
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}  # rows queued per device
        if self.per_device_share <= 0:
            self.per_device_share = max(1, self.queue_size // 8)
        self._rng = random.Random(self.seed)

    def start(self) -> "SampleCollector":
        if self.policy.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sample-writer", daemon=True)
            self._thread.start()
            log.info("collecting samples: %s", self.policy.to_dict())
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # --- request path: cheap and never blocking --------------------------------
    def wants(self, device_id: str, flagged: bool) -> bool:
        if not self.policy.covers(device_id):
            return False
        return flagged or (self.policy.rate > 0 and self._rng.random() < self.policy.rate)

    def note_status(self, device_id: str, status: dict[str, Any]) -> None:
        """The bundle the device runs, from its retained status: ``version`` (manifest sha256 when none)."""
        version = status.get("version") or status.get("bundle_sha256") or ""
        self.device_state.setdefault(device_id, {})["bundle"] = str(version)[:128]

    def note_telemetry(self, device_id: str, window: dict[str, Any]) -> None:
        drift = window.get("drift")
        if isinstance(drift, dict) and "flag" in drift:
            self.device_state.setdefault(device_id, {})["drift"] = bool(drift["flag"])

    def offer(self, device_id: str, x: np.ndarray, answer: Mapping[str, Any] | Sequence[float], *,
              confidence: float | None, flagged: bool, bundle: str = "") -> None:
        """Queue one collected request (called after the reply went out); dropped and counted when full.

        ``answer``: the teacher's reply (`Task.answer`), or a classifier's probabilities.
        """
        if not isinstance(answer, Mapping):
            answer = {"probabilities": list(answer)}
        teacher, label, uncertainty = self.task.teacher_record(answer)
        state = self.device_state.get(device_id, {})
        row = {"device_id": device_id, "bundle": bundle or state.get("bundle", ""), "received": time.time(),
               "input": wire.encode_tensor(x), "teacher_probs": teacher,
               "teacher_label": label, "uncertainty": uncertainty, "confidence": confidence,
               "drift": state.get("drift"), "flagged": bool(flagged)}
        with self._lock:  # one device may hold only its share of the queue: its flood never drops another's rows
            held = self._held.get(device_id, 0)
            fits = held < self.per_device_share
            if fits:
                try:
                    self._q.put_nowait(row)
                    self._held[device_id] = held + 1
                except queue.Full:
                    fits = False
        if not fits:
            self.metrics.inc("gateway_samples_dropped_total", "Collected samples dropped (writer behind)",
                             device=device_id)

    # --- writer thread -----------------------------------------------------------
    def _run(self) -> None:
        last_trim = 0.0
        while not self._stop.is_set() or not self._q.empty():
            rows = self._drain()
            if rows:
                self._fill_bundles(rows)
                try:
                    self.store.samples.add(rows)
                    self.metrics.inc("gateway_samples_stored_total", "Collected samples stored", float(len(rows)))
                except Exception:  # the database is away: count, log, go on (the replies were sent)
                    log.exception("storing %d collected samples failed", len(rows))
                    self.metrics.inc("gateway_samples_dropped_total", "Collected samples dropped", float(len(rows)))
            if rows or time.monotonic() - last_trim > self.trim_every_s:
                self.trim()
                last_trim = time.monotonic()

    def _fill_bundles(self, rows: list[dict[str, Any]]) -> None:
        """A device's status and its first request travel on different connections: a row that beat the status
        gets the bundle from the store (written after the reply, so off the request path)."""
        for row in rows:
            if not row["bundle"]:
                st = (self.store.devices.get(row["device_id"]) or {}).get("status") or {}
                if isinstance(st, dict):
                    self.note_status(row["device_id"], st)
                row["bundle"] = self.device_state.get(row["device_id"], {}).get("bundle", "")

    def _drain(self) -> list[dict[str, Any]]:
        try:
            rows = [self._q.get(timeout=0.2)]
        except queue.Empty:
            return []
        while len(rows) < self.batch:
            try:
                rows.append(self._q.get_nowait())
            except queue.Empty:
                break
        with self._lock:
            for row in rows:
                d = row["device_id"]
                self._held[d] -= 1
                if not self._held[d]:
                    del self._held[d]
        return rows

    def trim(self) -> int:
        p = self.policy
        older = time.time() - p.retention_days * 86400 if p.retention_days > 0 else None
        try:
            return self.store.samples.trim(max_per_device=p.max_per_device, max_total=p.max_total, older_than=older)
        except Exception:
            log.exception("trimming collected samples failed")
            return 0

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every queued row is written (tests, shutdown)."""
        end = time.monotonic() + timeout
        while not self._q.empty() and time.monotonic() < end:
            time.sleep(0.02)
        time.sleep(0.3)  # the batch being written
