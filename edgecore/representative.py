"""The representative set: class-stratified INT8 calibration data, stored once.

The data type every backend's INT8 calibration reads (ONNX Runtime,
NNCF/OpenVINO, LiteRT, TensorRT), with its content hash, so the bundle's
manifest can name the data by its sha256. Selection lives in
`calibration.representative`; this is the contract both sides share.

Numpy only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from edgecore.errors import DataError

__all__ = ["RepresentativeSet", "load_representative_set", "content_digest", "METHOD", "RANDOM"]

METHOD = "class-stratified"
RANDOM = "random"  # inputs without one class each (detection): a seeded random draw, labels -1


@dataclass(frozen=True)
class RepresentativeSet:
    """Normalised model inputs (what the model takes) plus their labels and provenance."""

    inputs: np.ndarray  # float32, batch first, already preprocessed
    labels: np.ndarray  # int64 (-1: not stratified)
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


def content_digest(inputs: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(inputs.shape).encode())
    h.update(np.ascontiguousarray(inputs, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()



def load_representative_set(path: Path) -> RepresentativeSet:
    """Read a stored set and check its content hash."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            x, yy, idx = z["inputs"], z["labels"], z["indices"]
            stored, method = str(z["sha256"]), str(z["method"])
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: not a readable calibration set ({e})") from e
    digest = content_digest(x, yy)
    if digest != stored:
        raise DataError(f"{path}: calibration set content does not match its sha256 (corrupt or edited)")
    return RepresentativeSet(inputs=x, labels=yy, indices=idx, sha256=digest, method=method, path=path)
