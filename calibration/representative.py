"""The representative set: one class-stratified INT8 calibration sample, stored once.

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
from edgecore.representative import METHOD, RepresentativeSet, load_representative_set
from edgecore.representative import content_digest as _digest

__all__ = ["RepresentativeSet", "select_stratified", "build_representative_set", "load_representative_set"]



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


def build_representative_set(
    *, inputs: np.ndarray, labels: np.ndarray, n: int, seed: int = 0, path: Path | None = None
) -> RepresentativeSet:
    """Select ``n`` stratified samples of the (preprocessed) training inputs; store at ``path``.

    If ``path`` already holds a set with the same content it is reused as is
    (stored once, reused by every backend and every build of the run).
    """
    idx = select_stratified(labels, n, seed=seed)
    x = np.ascontiguousarray(inputs[idx], dtype=np.float32)
    yy = np.asarray(labels[idx], dtype=np.int64)
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
        np.savez(buf, inputs=x, labels=yy, indices=idx.astype(np.int64), sha256=np.array(digest), method=np.array(METHOD))
        atomic_write_bytes(path, buf.getvalue())
    return RepresentativeSet(inputs=x, labels=yy, indices=idx, sha256=digest, path=path)
