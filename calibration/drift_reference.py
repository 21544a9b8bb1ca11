"""``drift_reference.json``: what reference data looked like, for the agent's drift tests.

Histograms (edges + counts) and a sample of at most 1000 values of the
calibrated confidence and of two per-input statistics of the *raw* input (the
mean and the standard deviation of each sample), the same statistics
`device_agent.drift` computes on live inputs; for a task with output statistics
(`edgecore.tasks.Task.OUTPUT_STATS`: a detector's objects per image and top
score) also those, under ``outputs``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SCHEMA = 1
BINS = 10
SAMPLE = 1000


def _summary(values: np.ndarray, *, bins: int, lo: float | None = None, hi: float | None = None, seed: int = 0) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    lo = float(v.min()) if lo is None else lo
    hi = float(v.max()) if hi is None else hi
    if hi <= lo:
        hi = lo + 1e-6
    # quantile edges keep every bin populated (PSI needs non-empty reference bins)
    edges = np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)))
    if len(edges) < 3:
        edges = np.linspace(lo, hi, bins + 1)
    edges[0], edges[-1] = min(edges[0], lo), max(edges[-1], hi)
    counts, _ = np.histogram(v, bins=edges)
    rng = np.random.default_rng(seed)
    sample = v if len(v) <= SAMPLE else rng.choice(v, SAMPLE, replace=False)
    return {"edges": edges.tolist(), "counts": counts.astype(int).tolist(), "sample": [float(x) for x in sample]}


def drift_reference(*, raw: np.ndarray, conf: np.ndarray, measure: str, temperature: float, bins: int = BINS,
                    outputs: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """``outputs``: per-input output statistics by name (`Task.output_stats` of the artifact's predictions)."""
    flat = np.asarray(raw, dtype=np.float64).reshape(len(raw), -1)
    extra = {"outputs": {k: _summary(v, bins=bins) for k, v in outputs.items()}} if outputs else {}
    return {
        "schema_version": SCHEMA,
        "confidence": _summary(conf, bins=bins, lo=0.0, hi=1.0),
        "features": {"mean": _summary(flat.mean(axis=1), bins=bins), "std": _summary(flat.std(axis=1), bins=bins)},
        "measure": measure,
        "temperature": float(temperature),
        "n": int(len(raw)),
        **extra,
    }
