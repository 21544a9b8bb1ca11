"""Drift scores of live data against the bundle's ``drift_reference.json``.

Two views, both numpy-only: the population stability index over the
reference's histogram bins (robust to sample size, the usual 0.1/0.25 rule of
thumb) and a two-sample Kolmogorov-Smirnov test against the reference sample
(a p-value, sensitive to shifts the bins hide). Scored on the confidence, on
per-input statistics of the raw input (mean and std of each sample) and, for a
task that has them, on statistics of the answers (`DriftMonitor.observe_outputs`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from itertools import groupby
from typing import Any, Sequence

import numpy as np

PSI_EPS = 1e-4


def psi(reference_counts: np.ndarray, edges: np.ndarray, live: np.ndarray) -> float:
    """Population stability index of ``live`` in the reference bins (outliers go to end bins)."""
    ref = np.asarray(reference_counts, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    clipped = np.clip(np.asarray(live, dtype=np.float64), edges[0], edges[-1])
    cur, _ = np.histogram(clipped, bins=edges)
    p = np.maximum(ref / max(ref.sum(), 1.0), PSI_EPS)
    q = np.maximum(cur / max(cur.sum(), 1), PSI_EPS)
    return float(np.sum((q - p) * np.log(q / p)))


def ks_2samp(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic D and its asymptotic p-value (Stephens' correction)."""
    a = np.sort(np.asarray(a, dtype=np.float64))
    b = np.sort(np.asarray(b, dtype=np.float64))
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return 0.0, 1.0
    allv = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, allv, side="right") / n
    cdf_b = np.searchsorted(b, allv, side="right") / m
    d = float(np.max(np.abs(cdf_a - cdf_b)))
    ne = n * m / (n + m)
    lam = (math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * d
    if lam < 1e-3:
        return d, 1.0
    p = 2.0 * sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam) for k in range(1, 101))
    return d, float(min(max(p, 0.0), 1.0))


def reference_bins(ref: dict[str, Any], *, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) for PSI: deciles of the reference sample when it has one.

    Why: fixed-width bins over a confidence that piles up near 1.0 leave many
    nearly empty bins, and PSI over near-empty bins is noise. Quantile bins
    give every bin ~10% of the reference mass (the usual PSI practice).
    """
    sample = np.asarray(ref.get("sample") or [], dtype=np.float64)
    if len(sample) >= 5 * bins:
        edges = np.unique(np.quantile(sample, np.linspace(0.0, 1.0, bins + 1)))
        if len(edges) >= 3:
            counts, _ = np.histogram(sample, bins=edges)
            return counts, edges
    return np.asarray(ref["counts"], dtype=np.float64), np.asarray(ref["edges"], dtype=np.float64)


@dataclass(frozen=True)
class DriftConfig:
    window: int = 500  # most recent inputs compared with the reference
    min_samples: int = 50  # below this no score is reported (too noisy)
    psi_threshold: float = 0.25
    ks_alpha: float = 0.01
    # KS flags only a shift that is also material: D (the largest gap between the two CDFs) at least this. On a
    # full window KS resolves gaps too small to matter: a refreshed demo bundle whose drift reference (held-out
    # collected inputs) was a little more confident than the new inputs (D 0.11-0.15, p down to 0.004) had its
    # canary rolled back as drifting. A real shift moves D far past it (the demo's quarter turn: confidence D
    # 0.83, std 0.39), and on a full window PSI still flags a material shift of any one statistic.
    ks_min_d: float = 0.2
    # PSI counts towards the flag only from this many inputs per reference bin (200 for 10 bins). On fewer it is
    # biased up (one empty bin alone scores ~0.7): windows of 50 inputs drawn from the reference itself were
    # flagged 146 times in 200 (three statistics). Below it the KS test decides alone; its p-value holds at any size.
    psi_min_per_bin: int = 20


class DriftMonitor:
    """Keeps the last ``window`` confidences and input statistics; scores them on demand.

    Why a ring of one numpy array, filled in blocks: per-input numpy reductions
    (a float64 copy, a sum, a dot product) cost about as much as a tiny model's
    inference. The agent's `device_agent.telemetry.TelemetryRecorder` keeps single
    inputs as bytes and hands them over a block at a time (`observe_bytes`), whose
    mean and std are computed at once (float64 sums). PSI and KS do not depend on
    order, so ``scores`` reads the ring as it lies.
    """

    STATS = ("confidence", "mean", "std")

    def __init__(self, reference: dict[str, Any] | None, config: DriftConfig = DriftConfig()) -> None:
        self.config = config
        self.reference = reference
        self._ring = np.zeros((len(self.STATS), max(1, config.window)), dtype=np.float64)
        self._next = 0  # write position
        self._n = 0  # filled slots
        # the answers' side (a task's `OUTPUT_STATS`: a detector's objects per image, its top score), by name:
        # compared with the reference's ``outputs`` when it has them
        self._outputs: dict[str, deque[float]] = {}

    def observe_outputs(self, names: Sequence[str], values: Sequence[float]) -> None:
        """One answer's output statistics (``values[i]`` is statistic ``names[i]``)."""
        w = max(1, self.config.window)
        for name, v in zip(names, values):
            ring = self._outputs.get(name)
            if ring is None:
                ring = self._outputs[name] = deque(maxlen=w)
            ring.append(float(v))

    def observe(self, *, confidence: np.ndarray, raw: np.ndarray) -> None:
        """A batch: its confidences and raw samples (batch first)."""
        conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
        self._put(np.stack((conf, *self._mean_std(np.asarray(raw).reshape(len(conf), -1)))))

    def observe_bytes(self, confidence: Sequence[float], data: Sequence[bytes]) -> None:
        """Inputs given as their float32 bytes (each one sample) with their confidences: one vectorised pass.

        Samples of different sizes (a caller feeding several shapes) are scored one run of equal sizes at a time.
        """
        if not data:
            return
        if len(set(map(len, data))) > 1:
            for _, run in groupby(zip(confidence, data), key=lambda cd: len(cd[1])):
                conf, chunk = zip(*run)
                self.observe_bytes(conf, chunk)
            return
        flat = np.frombuffer(b"".join(data), dtype=np.float32).reshape(len(data), -1)
        self._put(np.stack((np.asarray(confidence, dtype=np.float64), *self._mean_std(flat))))

    @staticmethod
    def _mean_std(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = flat.shape[1]
        mean = flat.sum(axis=1, dtype=np.float64) / d
        sq = np.einsum("ij,ij->i", flat, flat, dtype=np.float64) / d
        return mean, np.sqrt(np.maximum(sq - mean * mean, 0.0))

    def _put(self, cols: np.ndarray) -> None:
        w = self._ring.shape[1]
        k = cols.shape[1]
        if k >= w:  # only the newest window survives
            self._ring[:] = cols[:, k - w :]
            self._next, self._n = 0, w
            return
        end = self._next + k
        if end <= w:
            self._ring[:, self._next : end] = cols
        else:
            split = w - self._next
            self._ring[:, self._next :] = cols[:, :split]
            self._ring[:, : k - split] = cols[:, split:]
        self._next = end % w
        self._n = min(w, self._n + k)

    def live(self, name: str) -> np.ndarray:
        """The retained values of one statistic (order not kept)."""
        if name in self._outputs:
            return np.asarray(self._outputs[name], dtype=np.float64)
        return self._ring[self.STATS.index(name), : self._n].copy()

    def _ref(self, name: str) -> dict[str, Any] | None:
        if not self.reference:
            return None
        if name == "confidence":
            return self.reference.get("confidence")
        if name in self._outputs:
            return (self.reference.get("outputs") or {}).get(name)
        return (self.reference.get("features") or {}).get(name)

    def scores(self) -> dict[str, Any] | None:
        """``{stat: {psi, ks_d, ks_p}, flag, n}`` or None without a reference or enough data.

        ``flag``: some statistic's KS p-value is below ``ks_alpha`` with D at least ``ks_min_d``, or, once the
        window holds at least ``psi_min_per_bin`` inputs per reference bin, its PSI is above ``psi_threshold``
        (PSI is reported either way; no key says which applied: the gateway's telemetry check takes only
        statistics besides ``flag`` and ``n``, so a new key would get every window refused by a gateway not yet
        upgraded).
        """
        n = self._n
        if not self.reference or n < self.config.min_samples:
            return None
        out: dict[str, Any] = {"n": n}
        flag = False
        for name in (*self.STATS, *self._outputs):
            ref = self._ref(name)
            if not ref:
                continue
            live = self.live(name)
            if len(live) < self.config.min_samples:
                continue
            counts, edges = reference_bins(ref)
            s_psi = psi(counts, edges, live)
            d, p = ks_2samp(live, np.asarray(ref.get("sample") or [], dtype=np.float64))
            out[name] = {"psi": round(s_psi, 6), "ks_d": round(d, 6), "ks_p": p}
            use_psi = len(live) >= self.config.psi_min_per_bin * len(counts)
            ks_flag = p < self.config.ks_alpha and d >= self.config.ks_min_d
            flag = flag or (use_psi and s_psi > self.config.psi_threshold) or ks_flag
        out["flag"] = flag
        return out

    def reset(self, reference: dict[str, Any] | None) -> None:
        """A new bundle brings a new reference; old samples no longer compare."""
        self.reference = reference
        self._next = self._n = 0
        self._outputs.clear()
