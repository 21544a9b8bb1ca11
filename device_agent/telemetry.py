"""The telemetry recorder: per-window counts, latency histograms and drift, closed into messages.

Why the open window lives in a memory-mapped file: an input counted there is
in the kernel's page cache the moment it is counted, so a ``kill -9`` (or any
crash of the process) loses nothing; the next start continues the same window
(same ``seq``) from the file. The agent flushes the mapping to disk
periodically against power loss. Each window carries ``seq`` (per state dir,
persisted in the outbox) and ``boot`` (a random id created with the state
dir): the gateway deduplicates on ``(device, boot, seq)``, so a device whose
state dir was wiped starts a new ``boot`` instead of colliding with its old
windows.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .drift import DriftConfig, DriftMonitor
from .histogram import LatencyHistogram

log = logging.getLogger(__name__)

COUNT_KEYS: tuple[str, ...] = (
    "inputs", "edge", "cloud", "fallback", "fallback_timeout", "fallback_broker", "fallback_error", "rollbacks",
)
_MAGIC = 0x45_57_49_4E_30_31  # "EWIN01": layout version of the window file
_HDR = 4  # magic, seq, t_start (microseconds), reserved
_SLOT = {k: _HDR + i for i, k in enumerate(COUNT_KEYS)}
_SLOT_INPUTS, _SLOT_EDGE = _SLOT["inputs"], _SLOT["edge"]


class WindowCounters:
    """The open window: its ``seq``, start time and counts; in a memory-mapped file when given a path."""

    def __init__(self, path: Path | None = None) -> None:
        n = _HDR + len(COUNT_KEYS)
        self.path = path
        self._mm: np.memmap | None = None
        if path is None:
            self._a: np.ndarray = np.zeros(n, dtype=np.int64)
            self._a[0], self._a[1] = _MAGIC, -1
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not path.is_file() or path.stat().st_size != n * 8
        if not fresh:
            self._a = np.memmap(path, dtype=np.int64, mode="r+", shape=(n,))
            fresh = int(self._a[0]) != _MAGIC
            if fresh:
                log.warning("%s: not a window file of this version; starting a new window", path)
        if fresh:
            tmp = path.with_suffix(".tmp")
            init = np.zeros(n, dtype=np.int64)
            init[0], init[1] = _MAGIC, -1
            tmp.write_bytes(init.tobytes())
            tmp.replace(path)
            self._a = np.memmap(path, dtype=np.int64, mode="r+", shape=(n,))
        self._mm = self._a
        # counted through a plain view of the same pages: numpy's memmap subclass costs ~1 µs per increment
        self._a = self._mm.view(np.ndarray)

    @property
    def seq(self) -> int:
        return int(self._a[1])

    @property
    def t_start(self) -> float:
        return int(self._a[2]) / 1e6

    def add(self, counts: dict[str, int]) -> None:
        a = self._a
        for k, v in counts.items():
            a[_SLOT[k]] += v

    def add_one_edge(self) -> None:
        """``add({"inputs": 1, "edge": 1})`` without the dict: the per-input case."""
        a = self._a
        a[_SLOT_INPUTS] += 1
        a[_SLOT_EDGE] += 1

    def counts(self) -> dict[str, int]:
        return {k: int(v) for k, v in zip(COUNT_KEYS, self._a[_HDR:])}

    def reset(self, *, seq: int, t_start: float) -> None:
        """Start window ``seq``; the seq is written last, so a crash midway reads as the old, closed window."""
        self._a[_HDR:] = 0
        self._a[2] = int(t_start * 1e6)
        self._a[1] = seq

    def sync(self) -> None:
        """Flush the mapping to disk (the page cache already survives a crash of the process)."""
        if self._mm is not None:
            self._mm.flush()


def answer_counts(routes: Iterable[tuple[str, str | None]]) -> dict[str, int]:
    """Count keys for answers given as ``(route, fallback reason)``."""
    out: dict[str, int] = {}
    n = 0
    for route, reason in routes:
        n += 1
        out[route] = out.get(route, 0) + 1
        if reason:
            k = f"fallback_{reason}"
            out[k] = out.get(k, 0) + 1
    if n:
        out["inputs"] = n
    return out


class TelemetryRecorder:
    """Cumulative and per-window counts, edge/cloud latency histograms, and the drift monitor."""

    def __init__(self, drift_reference: dict[str, Any] | None, drift: DriftConfig = DriftConfig(),
                 window: WindowCounters | None = None) -> None:
        self.totals: dict[str, int] = dict.fromkeys(COUNT_KEYS, 0)
        self.window = window or WindowCounters()
        self.edge_latency = LatencyHistogram()
        self.cloud_latency = LatencyHistogram()
        self.drift = DriftMonitor(drift_reference, drift)
        self.last_drift: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def observe(self, *, seconds: float, confidence: np.ndarray, raw: np.ndarray) -> None:
        """One batch through the local model."""
        self.edge_latency.observe(seconds)
        self.drift.observe(confidence=confidence, raw=raw)

    def observe_one(self, seconds: float, confidence: float, raw: np.ndarray) -> None:
        """One input through the local model (``raw`` holds one sample)."""
        self.edge_latency.observe(seconds)
        self.drift.observe_one(confidence, raw)

    def reset_drift(self, reference: dict[str, Any] | None) -> None:
        """A new model brings its own reference: the old inputs and the last verdict (flag) no longer apply.

        Without clearing the verdict, a device would keep acting as drifted (sending a share of its confident
        inputs to the cloud) for up to a window after switching to a bundle made for the inputs it now sees.
        """
        with self._lock:
            self.drift.reset(reference)
            self.last_drift = None

    def observe_cloud(self, rtt_s: float) -> None:
        self.cloud_latency.observe(rtt_s)

    def count(self, counts: dict[str, int]) -> None:
        with self._lock:
            for k, v in counts.items():
                self.totals[k] += v
            self.window.add(counts)

    def count_one_edge(self) -> None:
        """``count({"inputs": 1, "edge": 1})``: one input answered at the edge, the per-input case."""
        with self._lock:
            t = self.totals
            t["inputs"] += 1
            t["edge"] += 1
            self.window.add_one_edge()

    def close_window(self, *, t_end: float, emit: Callable[[dict[str, Any]], int]) -> dict[str, Any]:
        """Close the open window into a message body and hand it to ``emit`` before starting the next.

        ``emit`` stores the message durably and returns the next window's seq; it
        runs before the counters reset, so a crash in between finds the window
        already stored (the outbox records its seq) rather than lost.
        """
        with self._lock:
            w, seq, t_start = self.window.counts(), self.window.seq, self.window.t_start
            edge = self.edge_latency.snapshot_and_reset()
            cloud = self.cloud_latency.snapshot_and_reset()
            n = w["inputs"]
            self.last_drift = self.drift.scores()
            msg = {
                "seq": seq, "t_start": t_start, "t_end": t_end, "counts": w,
                "offload_rate": (w["cloud"] + w["fallback"]) / n if n else 0.0,
                "fallback_rate": w["fallback"] / n if n else 0.0,
                "latency": {"edge": edge.summary(), "cloud_rtt": cloud.summary()},
                "drift": self.last_drift,
            }
            self.window.reset(seq=emit(msg), t_start=t_end)
        return msg
