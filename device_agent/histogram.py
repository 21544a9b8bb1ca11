"""Latency histograms with fixed log-spaced buckets (not lists of samples).

Why fixed buckets: memory stays constant however many inputs a window holds,
windows from many devices can be summed, and the same buckets become a
Prometheus histogram on the gateway.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

# 10 buckets per decade from 10 us to 100 s (upper bounds, seconds); +Inf is the last.
BUCKETS: tuple[float, ...] = tuple(float(f"{v:.6g}") for v in np.logspace(-5, 2, 71))


class LatencyHistogram:
    """Thread-safe histogram of durations in seconds."""

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)
        self.total = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        i = int(np.searchsorted(self.bounds, seconds, side="left"))
        with self._lock:
            self.counts[i] += 1
            self.total += seconds

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-quantile (None when empty)."""
        with self._lock:
            n = int(self.counts.sum())
            if n == 0:
                return None
            cum = np.cumsum(self.counts)
            i = int(np.searchsorted(cum, q * n, side="left"))
        return float(self.bounds[i]) if i < len(self.bounds) else float("inf")

    def summary(self) -> dict[str, Any]:
        n = self.count
        return {
            "count": n,
            "mean": (self.total / n) if n else None,
            "p50": self.quantile(0.50),
            "p95": self.quantile(0.95),
            "p99": self.quantile(0.99),
        }

    def snapshot_and_reset(self) -> "LatencyHistogram":
        with self._lock:
            snap = LatencyHistogram(tuple(self.bounds))
            snap.counts = self.counts.copy()
            snap.total = self.total
            self.counts[:] = 0
            self.total = 0.0
        return snap

    def merge(self, other: "LatencyHistogram") -> None:
        with self._lock:
            self.counts += other.counts
            self.total += other.total
