"""The representative set: one class-stratified INT8 calibration sample, stored once.

Every backend's INT8 calibration (ONNX Runtime, NNCF/OpenVINO, LiteRT, TensorRT)
reads the same ``.npz`` through a small adapter (`calibration.adapters`), so two
bundles built from one run were calibrated on identical data, and the bundle's
manifest can name that data by its sha256.

Numpy only.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from toolchain.errors import DataError
from toolchain.fsutil import atomic_write_bytes

__all__ = ["RepresentativeSet", "select_stratified", "build_representative_set", "load_representative_set"]

METHOD = "class-stratified"


@dataclass(frozen=True)
class RepresentativeSet:
    """Normalised model inputs (what the model takes) plus their labels and provenance."""

    inputs: np.ndarray  # float32, batch first, already preprocessed
    labels: np.ndarray  # int64
    indices: np.ndarray  # positions in the training split
    sha256: str
    method: str = METHOD
    path: Path | None = None

    def __len__(self) -> int:
        return int(len(self.inputs))

    def batches(self, batch_size: int = 1) -> Iterator[np.ndarray]:
        for i in range(0, len(self.inputs), batch_size):
            yield self.inputs[i : i + batch_size]

    def provenance(self) -> dict[str, object]:
        """The manifest's ``calibration`` block."""
        return {"dataset_sha256": self.sha256, "samples": len(self), "method": self.method}


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


def _digest(inputs: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(inputs.shape).encode())
    h.update(np.ascontiguousarray(inputs, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


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


def load_representative_set(path: Path) -> RepresentativeSet:
    """Read a stored set and check its content hash."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            x, yy, idx = z["inputs"], z["labels"], z["indices"]
            stored, method = str(z["sha256"]), str(z["method"])
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: not a readable calibration set ({e})") from e
    digest = _digest(x, yy)
    if digest != stored:
        raise DataError(f"{path}: calibration set content does not match its sha256 (corrupt or edited)")
    return RepresentativeSet(inputs=x, labels=yy, indices=idx, sha256=digest, method=method, path=path)
