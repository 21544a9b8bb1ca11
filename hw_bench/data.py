"""Test data for accuracy mode: raw samples and labels (bundles carry none).

An ``.npz`` with ``X_raw`` (raw, un-normalised, batch first) and ``y`` (int
labels, or what the model's task reads: a detector's padded ``(N, K, 5)``
objects), given by path or by http(s) URL (fleet jobs), or a run directory's
test split on the cloud side. Torch-free.
"""

from __future__ import annotations

import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecore.errors import BenchError


@dataclass(frozen=True)
class TestData:
    __test__ = False  # not a pytest class

    X_raw: np.ndarray
    y: np.ndarray
    source: str

    def __len__(self) -> int:
        return int(self.y.shape[0])


def load_npz(path_or_url: str | Path, *, timeout_s: float = 30.0) -> TestData:
    """Read ``X_raw``/``y`` from an .npz file or URL; errors name what is wrong."""
    src = str(path_or_url)
    if src.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(src, timeout=timeout_s) as r:
                blob = r.read()
        except OSError as e:
            raise BenchError(f"cannot fetch test data {src}: {e}") from e
        with tempfile.NamedTemporaryFile(suffix=".npz", delete=False) as f:
            f.write(blob)
            path = Path(f.name)
    else:
        path = Path(src)
        if not path.is_file():
            raise BenchError(f"test data {path}: no such file (want an .npz with X_raw and y)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("X_raw", "y") if k not in z.files]
            if missing:
                raise BenchError(f"test data {src}: lacks {', '.join(missing)} (has {', '.join(z.files) or 'nothing'})")
            X, y = np.asarray(z["X_raw"], np.float32), _targets(z["y"])
    except BenchError:
        raise
    except (OSError, ValueError) as e:
        raise BenchError(f"test data {src}: not a readable .npz ({e})") from e
    if X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise BenchError(f"test data {src}: {X.shape[0]} samples but {y.shape[0]} labels")
    return TestData(X, y, src)


def from_run_dir(run_dir: str | Path) -> TestData:
    """The test split recorded in a run directory (cloud side: needs the toolchain)."""
    from toolchain.rundir import RunDir

    X, y = RunDir(Path(run_dir)).splits().test
    return TestData(np.asarray(X, np.float32), _targets(y), f"{run_dir}:test")


def _targets(y: object) -> np.ndarray:
    """Class indices as int64; other targets (a detector's padded ``(N, K, 5)`` boxes) as they are."""
    a = np.asarray(y)
    return a.astype(np.int64) if a.dtype.kind in "iub" or a.ndim == 1 else a


def save_npz(path: Path, data: TestData) -> None:
    import io

    from edgecore.fsutil import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, X_raw=data.X_raw, y=data.y)
    atomic_write_bytes(path, buf.getvalue())
