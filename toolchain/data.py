"""Data sources: ``digits``, ``imagefolder:PATH``, ``python:module:function``.

A source yields *raw* arrays (batch first, float32, un-normalised) and labels.
The split is stratified and seeded, and the normalisation statistics come from
the training split only: the device must reproduce the preprocessing exactly,
so they are recorded in ``data.json`` as an `InputSpec`.

Torch-free: numpy, scikit-learn and Pillow only.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from edgecore.errors import ConfigError, DataError
from targets.base import InputSpec
from toolchain.config import Config, DataConfig

_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass(frozen=True)
class RawData:
    """All samples of a source, before splitting."""

    X: np.ndarray  # float32, batch first: (N, C, H, W) or (N, F)
    y: np.ndarray  # int64 class indices
    labels: tuple[str, ...]
    layout: str  # "NCHW" | "NF"
    scale: float  # raw * scale, before mean/std

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.X, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(self.y, dtype=np.int64).tobytes())
        h.update(str(self.X.shape).encode())
        return h.hexdigest()


@dataclass(frozen=True)
class Splits:
    """Train/val/test as (X raw float32, y int64) tuples, plus how to normalise."""

    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    input_spec: InputSpec
    labels: tuple[str, ...]
    sha256: str

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def load_source(cfg: DataConfig) -> RawData:
    """Read every sample of ``cfg.source``; errors name the source and the problem."""
    src = cfg.source
    if src == "digits":
        return _digits()
    if src.startswith("imagefolder:"):
        return _imagefolder(Path(src.split(":", 1)[1]), size=cfg.image_size, channels=cfg.channels)
    if src.startswith("python:"):
        return _python_factory(src)
    raise ConfigError(f"data.source: unknown source {src!r} (digits, imagefolder:PATH, python:module:function)")


def _digits() -> RawData:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = d.images.astype(np.float32)[:, None, :, :]  # (N, 1, 8, 8), values 0..16
    return RawData(X=X, y=d.target.astype(np.int64), labels=tuple(str(i) for i in range(10)), layout="NCHW", scale=1.0 / 16.0)


def _imagefolder(root: Path, *, size: int, channels: int) -> RawData:
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist or is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"image folder {str(root)!r} has {len(classes)} class sub-folder(s); need at least 2")
    xs: list[np.ndarray] = []
    ys: list[int] = []
    mode = "L" if channels == 1 else "RGB"
    for idx, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXT)
        if not files:
            raise DataError(f"image folder {str(root)!r}: class {name!r} has no images")
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert(mode).resize((size, size), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.float32)
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise DataError(f"image folder {str(root)!r}: cannot read image {str(f)!r}: {e}") from e
            xs.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
            ys.append(idx)
    X = np.stack(xs).astype(np.float32)
    return RawData(X=X, y=np.asarray(ys, np.int64), labels=tuple(classes), layout="NCHW", scale=1.0 / 255.0)


def import_dirs(cfg: Config) -> list[str]:
    """Folders where ``cfg``'s ``python:`` factories are looked for besides ``sys.path``.

    The config file's folder first, then the working directory (absolute), and
    only when the config names a ``python:`` factory. `train` records them in
    ``data.json`` so later commands find the module from any directory.
    """
    if not any(s.startswith("python:") for s in (cfg.data.source, cfg.teacher.family)):
        return []
    dirs = []
    if Path(cfg.source_file).is_file():
        dirs.append(str(Path(cfg.source_file).resolve().parent))
    dirs.append(str(Path.cwd().resolve()))
    return list(dict.fromkeys(dirs))


_ADDED_DIRS: list[str] = []  # what add_import_dirs put on sys.path (named in import errors)


def add_import_dirs(dirs: Iterable[str]) -> None:
    """Append ``dirs`` to ``sys.path``, after the installed packages, so they never shadow them."""
    for d in dirs:
        d = os.fspath(d)
        if d not in sys.path:
            sys.path.append(d)
        if d not in _ADDED_DIRS:
            _ADDED_DIRS.append(d)
    importlib.invalidate_caches()


def resolve_factory(spec: str, *, what: str) -> Callable[..., Any]:
    """``python:package.module:function`` -> the callable (errors name ``what``).

    The module is imported from ``sys.path`` plus the folders `add_import_dirs` added.
    """
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] != "python" or not parts[1] or not parts[2]:
        raise ConfigError(f"{what}: expected 'python:package.module:function', got {spec!r}")
    _, mod_name, fn_name = parts
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        where = ", ".join(repr(d) for d in _ADDED_DIRS) or "none"
        raise ConfigError(
            f"{what}: cannot import module {mod_name!r}: {e} (looked on sys.path and in the config file's folder and "
            f"the working directory recorded for this run: {where})"
        ) from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(
            f"{what}: module {mod_name!r} (from {getattr(module, '__file__', None) or 'a namespace package'}) "
            f"has no function {fn_name!r}"
        )
    return fn


def _python_factory(spec: str) -> RawData:
    """The factory returns ``(X, y)``, ``(X, y, labels)`` or a dict with X, y, [labels, scale]."""
    fn = resolve_factory(spec, what="data.source")
    try:
        out = fn()
    except Exception as e:  # the user's code: report it as a data problem, keep the cause
        raise DataError(f"data.source {spec!r} raised {type(e).__name__}: {e}") from e
    labels: Any = None
    scale = 1.0
    if isinstance(out, dict):
        X, y, labels, scale = out.get("X"), out.get("y"), out.get("labels"), float(out.get("scale", 1.0))
    elif isinstance(out, (tuple, list)) and len(out) in (2, 3):
        X, y = out[0], out[1]
        labels = out[2] if len(out) == 3 else None
    else:
        raise DataError(f"data.source {spec!r} must return (X, y), (X, y, labels) or a dict with X and y")
    try:
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
    except (TypeError, ValueError) as e:
        raise DataError(f"data.source {spec!r}: X and y must be numeric arrays: {e}") from e
    if X.ndim not in (2, 4):
        raise DataError(f"data.source {spec!r}: X must be (N, F) or (N, C, H, W), got shape {X.shape}")
    if y.ndim != 1 or len(y) != len(X):
        raise DataError(f"data.source {spec!r}: y must be 1-D with len(X)={len(X)} entries, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DataError(f"data.source {spec!r}: y must hold non-negative integer class indices")
    n_classes = int(y.max()) + 1 if len(y) else 0
    labels = tuple(str(v) for v in labels) if labels is not None else tuple(str(i) for i in range(n_classes))
    if len(labels) < max(n_classes, 2):
        raise DataError(f"data.source {spec!r}: {len(labels)} labels for {n_classes} classes (need >= 2)")
    return RawData(X=X, y=y.astype(np.int64), labels=labels, layout="NF" if X.ndim == 2 else "NCHW", scale=scale)


def split(raw: RawData, cfg: DataConfig, *, seed: int) -> Splits:
    """Deterministic stratified train/val/test split; stats from train only."""
    from sklearn.model_selection import train_test_split

    if not np.all(np.isfinite(raw.X)):
        raise DataError("data contains NaN or infinite values")
    counts = np.bincount(raw.y, minlength=len(raw.labels))
    present = counts[counts > 0]
    if len(present) < 2:
        raise DataError(f"data has {len(present)} class(es) with samples; need at least 2")
    if present.min() < 3:
        raise DataError(
            f"class {raw.labels[int(np.argmin(np.where(counts > 0, counts, 1 << 30)))]!r} has fewer than 3 samples; "
            "cannot make a stratified train/val/test split"
        )
    idx = np.arange(len(raw.y))
    try:
        rest, test = train_test_split(idx, test_size=cfg.test_fraction, random_state=seed, stratify=raw.y)
        val_share = cfg.val_fraction / (1.0 - cfg.test_fraction)
        train, val = train_test_split(rest, test_size=val_share, random_state=seed, stratify=raw.y[rest])
    except ValueError as e:
        raise DataError(f"cannot split the data ({len(idx)} samples): {e}") from e
    Xtr = raw.X[train] * np.float32(raw.scale)
    axes = (0,) if raw.layout == "NF" else (0, 2, 3)
    mean = Xtr.mean(axis=axes)
    std = Xtr.std(axis=axes)
    std = np.where(std < 1e-6, 1.0, std)
    spec = InputSpec(
        name="input",
        shape=(None, *raw.X.shape[1:]),
        dtype="float32",
        layout=raw.layout,
        scale=float(raw.scale),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
    )
    return Splits(
        train=(raw.X[train], raw.y[train]),
        val=(raw.X[val], raw.y[val]),
        test=(raw.X[test], raw.y[test]),
        input_spec=spec,
        labels=raw.labels,
        sha256=raw.sha256,
    )


def load_splits(cfg: DataConfig, *, seed: int) -> Splits:
    return split(load_source(cfg), cfg, seed=seed)


def data_record(
    splits: Splits, cfg: DataConfig, *, seed: int, python_dirs: Iterable[str] = ()
) -> dict[str, Any]:
    """What ``data.json`` holds: enough to reload the exact same splits (from any directory)."""
    source = cfg.source
    if source.startswith("imagefolder:"):  # absolute, so the run reloads from any directory
        source = "imagefolder:" + str(Path(source.split(":", 1)[1]).resolve())
    return {
        "source": source,
        "seed": seed,
        "sha256": splits.sha256,
        "splits": {k: int(len(getattr(splits, k)[1])) for k in ("train", "val", "test")},
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "input_spec": splits.input_spec.to_dict(),
        "labels": list(splits.labels),
        "python_dirs": list(python_dirs),
    }


def splits_from_record(record: dict[str, Any]) -> Splits:
    """Reload the splits ``data.json`` describes; refuse if the data changed."""
    add_import_dirs(record.get("python_dirs") or ())
    try:
        cfg = DataConfig(
            source=str(record["source"]),
            val_fraction=float(record["val_fraction"]),
            test_fraction=float(record["test_fraction"]),
            image_size=int(record.get("image_size", 32)),
            channels=int(record.get("channels", 3)),
        )
        seed = int(record["seed"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"data.json is incomplete: {e}") from e
    splits = load_splits(cfg, seed=seed)
    if splits.sha256 != record.get("sha256"):
        raise DataError(
            f"data source {cfg.source!r} changed since the run was made (sha256 {splits.sha256[:12]} != "
            f"{str(record.get('sha256'))[:12]})"
        )
    return splits
