"""Test data for accuracy mode: raw samples and labels (bundles carry none).

An ``.npz`` with ``X_raw`` (raw, un-normalised, batch first) and ``y`` (int
labels, or what the model's task reads: a detector's padded ``(N, K, 5)``
objects), given by path or by http(s) URL (fleet jobs), or a run directory's
test split on the cloud side. Torch-free.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

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


#: the most test data a download may bring (bytes on the wire, and each array once decompressed)
MAX_DATA_BYTES = 256 << 20


def load_npz(path_or_url: str | Path, *, timeout_s: float = 30.0, allowed: Sequence[str] | None = None,
             max_bytes: int = MAX_DATA_BYTES, deadline_s: float | None = None, tmp_dir: Path | None = None) -> TestData:
    """Read ``X_raw``/``y`` from an .npz file or http(s) URL; errors name what is wrong.

    A URL is fetched with `device_agent.updates.download`: only under ``allowed`` (default: the URL itself,
    for an operator's own command line), streamed to a temporary file (removed afterwards) within
    ``max_bytes`` and ``deadline_s``; its errors say "test data download failed", never why.
    """
    src = str(path_or_url)
    if not src.startswith(("http://", "https://")):
        return read_npz(Path(src), max_bytes=max_bytes)
    from device_agent.updates import DOWNLOAD_DEADLINE_S, download
    from edgecore.errors import BundleTrustError

    tmp = Path(tempfile.mkdtemp(prefix=f"bench-data.{os.getpid()}.", dir=tmp_dir))
    try:
        try:
            download(src, tmp / "data.npz", allowed=[src] if allowed is None else allowed, timeout=timeout_s,
                     max_bytes=max_bytes, deadline_s=DOWNLOAD_DEADLINE_S if deadline_s is None else deadline_s,
                     what="test data")
        except BundleTrustError as e:
            raise BenchError(str(e)) from e
        return read_npz(tmp / "data.npz", name=src, max_bytes=max_bytes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_npz(path: Path, *, name: str | None = None, max_bytes: int = MAX_DATA_BYTES) -> TestData:
    """``X_raw``/``y`` of the .npz at ``path``; ``name``: how errors call it (default: the path).

    Each array's decompressed size is checked from the archive's directory before it is read: a small
    compressed file cannot expand into memory past ``max_bytes``.
    """
    src = name or str(path)
    if not path.is_file():
        raise BenchError(f"test data {src}: no such file (want an .npz with X_raw and y)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("X_raw", "y") if k not in z.files]
            if missing:
                raise BenchError(f"test data {src}: lacks {', '.join(missing)} (has {', '.join(z.files) or 'nothing'})")
            for k in ("X_raw", "y"):
                size = z.zip.getinfo(f"{k}.npy").file_size
                if size > max_bytes:
                    raise BenchError(f"test data {src}: {k} is {size} bytes uncompressed, past the {max_bytes} bound")
            X, y = np.asarray(z["X_raw"], np.float32), _targets(z["y"])
    except BenchError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        if name is None:
            raise BenchError(f"test data {src}: not a readable .npz ({e})") from e
        raise BenchError(f"test data {src}: not a readable .npz") from e  # (a temporary file's path stays out)
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
