"""The representative set: one INT8 calibration sample, stored once.

Class-stratified where the inputs have one class each; a seeded random draw otherwise (detection).

Every backend's INT8 calibration (ONNX Runtime, NNCF/OpenVINO, LiteRT, TensorRT)
reads the same ``.npz`` (the type is `edgecore.representative`) through a small adapter per backend (`targets.calibration_data`), so two
bundles built from one run were calibrated on identical data, and the bundle's
manifest can name that data by its sha256.

Numpy only.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from edgecore.errors import DataError
from edgecore.fsutil import atomic_write_bytes
from edgecore.representative import METHOD, RANDOM, RepresentativeSet, load_representative_set
from edgecore.representative import content_digest as _digest

__all__ = ["RepresentativeSet", "select_stratified", "select_random", "build_representative_set",
           "load_representative_set"]



def select_stratified(y: np.ndarray, n: int, *, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` samples whose class proportions follow ``y``'s (every class at least once).

    Deterministic for a seed; sorted, so the stored set does not depend on set order.
    """
    y = np.asarray(y, dtype=np.int64)
    if n < 1:
        raise DataError(f"calibration set size must be >= 1, got {n}")
    if n >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    quota = np.maximum(1, np.floor(counts / counts.sum() * n)).astype(int)
    quota = np.minimum(quota, counts)
    # hand out the rounding remainder to the largest classes first
    order = np.argsort(-counts, kind="stable")
    i = 0
    while quota.sum() < n and i < 10 * len(classes):
        c = order[i % len(classes)]
        if quota[c] < counts[c]:
            quota[c] += 1
        i += 1
    while quota.sum() > n:
        c = order[int(np.argmax(quota[order] > 1))]
        quota[c] -= 1
    picked = [rng.choice(np.flatnonzero(y == cls), size=q, replace=False) for cls, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


def select_random(count: int, n: int, *, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` of ``count`` samples drawn without replacement (seeded, sorted)."""
    if n < 1:
        raise DataError(f"calibration set size must be >= 1, got {n}")
    if n >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=n, replace=False))


def build_representative_set(
    *, inputs: np.ndarray, labels: np.ndarray | None, n: int, seed: int = 0, path: Path | None = None
) -> RepresentativeSet:
    """Select ``n`` samples of the (preprocessed) training inputs, stratified by ``labels`` (one class index
    per input; None: a seeded random draw, stored with labels -1); store at ``path``.

    If ``path`` already holds a set with the same content it is reused as is
    (stored once, reused by every backend and every build of the run).
    """
    if labels is None:
        idx, method = select_random(len(inputs), n, seed=seed), RANDOM
        yy = np.full(len(idx), -1, np.int64)
    else:
        idx, method = select_stratified(labels, n, seed=seed), METHOD
        yy = np.asarray(labels[idx], dtype=np.int64)
    x = np.ascontiguousarray(inputs[idx], dtype=np.float32)
    digest = _digest(x, yy)
    if path is not None:
        path = Path(path)
        if path.exists():
            try:
                old = load_representative_set(path)
                if old.sha256 == digest:
                    return old
            except DataError:
                pass  # unreadable: rewrite below
        buf = io.BytesIO()
        np.savez(buf, inputs=x, labels=yy, indices=idx.astype(np.int64), sha256=np.array(digest), method=np.array(method))
        atomic_write_bytes(path, buf.getvalue())
    return RepresentativeSet(inputs=x, labels=yy, indices=idx, sha256=digest, method=method, path=path)
