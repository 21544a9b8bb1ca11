"""Data sources: ``digits``, ``imagefolder:PATH``, ``python:module:function`` (classification); ``shapes``,
``yolo:PATH``, ``coco:PATH/annotations.json`` (detection, `toolchain.detection`).

A source yields *raw* arrays (batch first, float32, un-normalised) and targets: class indices ``(N,)`` int64
for classification, for detection one padded float32 array ``(N, K_max, 5)`` of ``[class, x1, y1, x2, y2]`` in
input pixels per object (class -1: padding), so that every stage's ``(X, y)`` tuples and data loaders carry
either. The split is seeded and, where the task says so (`TrainTask.stratify`), stratified; the normalisation
statistics come from the training split only: the device must reproduce the preprocessing exactly, so they are
recorded in ``data.json`` as an `InputSpec`.

Torch-free: numpy, scikit-learn and Pillow only.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from edgecore.errors import ConfigError, DataError
from edgecore.spec import InputSpec
from edgecore.tasks import TaskSpec
from toolchain.config import Config, DataConfig

if TYPE_CHECKING:  # pragma: no cover
    from toolchain.tasks import TrainTask

_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass(frozen=True)
class RawData:
    """All samples of a source, before splitting."""

    X: np.ndarray  # float32, batch first: (N, C, H, W) or (N, F)
    y: np.ndarray  # int64 class indices, or (N, K_max, 5) float32 padded objects (detection)
    labels: tuple[str, ...]
    layout: str  # "NCHW" | "NF"
    scale: float  # raw * scale, before mean/std
    digest: str | None = None  # the source's own content digest (a detection set's), else computed below
    resize: str = "stretch"  # how an image file became H x W (`edgecore.spec.InputSpec.resize`)

    @property
    def sha256(self) -> str:
        if self.digest is not None:
            return self.digest
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.X, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(self.y, dtype=np.int64).tobytes())
        h.update(str(self.X.shape).encode())
        return h.hexdigest()


@dataclass(frozen=True)
class Splits:
    """Train/val/test (and calibration) as (X raw float32, y) tuples, plus how to normalise (``y``: see the
    module's docstring).

    ``calibration``: inputs no stage trains or selects a checkpoint on, for what the device uses to decide
    (temperature, routing threshold, drift reference); empty when ``data.calibration_fraction = 0``.
    """

    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    input_spec: InputSpec
    labels: tuple[str, ...]
    sha256: str
    calibration: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def load_source(cfg: DataConfig) -> RawData:
    """Read every sample of ``cfg.source``; errors name the source and the problem."""
    src = cfg.source
    if src == "digits":
        return _digits()
    if src == "mnist1d":
        return _mnist1d()
    if src.startswith("imagefolder:"):
        return _imagefolder(Path(src.split(":", 1)[1]), size=cfg.image_size, channels=cfg.channels)
    if src.startswith("python:"):
        return _python_factory(src)
    if src == "shapes" or src.startswith(("yolo:", "coco:")):
        return _detection(cfg)
    raise ConfigError(f"data.source: unknown source {src!r} (digits, mnist1d, imagefolder:PATH, python:module:function, "
                      "shapes, yolo:PATH, coco:PATH/annotations.json)")


def pad_objects(boxes: list[np.ndarray], classes: list[np.ndarray]) -> np.ndarray:
    """Per-image objects as one ``(N, K_max, 5)`` float32 array ``[class, x1, y1, x2, y2]``, class -1 padding
    (``K_max`` at least 1): what detection's ``y`` is in every split."""
    k = max([1] + [len(c) for c in classes])
    y = np.zeros((len(classes), k, 5), np.float32)
    y[:, :, 0] = -1
    for i, (b, c) in enumerate(zip(boxes, classes)):
        y[i, : len(c), 0] = c
        y[i, : len(c), 1:] = b
    return y


def unpad_objects(y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The inverse of `pad_objects`: per image ``(boxes (K, 4) float32, classes (K,) int64)``."""
    y = np.asarray(y)
    out = []
    for row in y:
        keep = row[:, 0] >= 0
        out.append((row[keep, 1:].astype(np.float32), row[keep, 0].astype(np.int64)))
    return out


def _detection(cfg: DataConfig) -> RawData:
    """A detection source (`toolchain.detection.load_source`) as images and padded objects."""
    from toolchain.detection import load_source as load_detection

    ds = load_detection(cfg.source, image_size=cfg.image_size, seed=0, count=cfg.count, channels=cfg.channels)
    if len(ds) == 0:
        raise DataError(f"data.source {cfg.source!r} holds no images")
    return RawData(X=ds.images.astype(np.float32), y=pad_objects(ds.boxes, ds.classes), labels=ds.labels,
                   layout="NCHW", scale=1.0 / 255.0, digest=ds.sha256, resize="letterbox")


def _digits() -> RawData:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = d.images.astype(np.float32)[:, None, :, :]  # (N, 1, 8, 8), values 0..16
    return RawData(X=X, y=d.target.astype(np.int64), labels=tuple(str(i) for i in range(10)), layout="NCHW", scale=1.0 / 16.0)


def _mnist1d() -> RawData:
    """MNIST-1D (Greydanus & Kobak, ICML 2024): 5,000 procedurally generated 1-D signals of 40 samples, 10 classes.

    Generated by the ``mnist1d`` package's own code with its published arguments
    (``get_dataset_args()``, seed 42), never downloaded. Its 4,000/1,000 train/test
    parts are pooled and split like any source (``data.val_fraction``...,
    ``run.seed``). Signals are (1, 1, 40) images: the image families slide their
    kernels along the one row (docs/toolchain.md, "Data sources").
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise DataError(f"data.source 'mnist1d' needs the mnist1d package ({e}): pip install 'edge-toolchain[toolchain]'") from e
    d = make_dataset(get_dataset_args())
    X = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)[:, None, None, :]
    y = np.concatenate([d["y"], d["y_test"]]).astype(np.int64)
    return RawData(X=X, y=y, labels=tuple(str(i) for i in range(10)), layout="NCHW", scale=1.0)


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


#: fewer calibration inputs than this and there is no calibration split: routing is fitted on the validation
#: split instead (the bundle says so)
MIN_CALIBRATION_ROWS = 30


def split(raw: RawData, cfg: DataConfig, *, seed: int, task: "type[TrainTask] | None" = None) -> Splits:
    """Deterministic train/val/test (and calibration) split, stratified where ``task`` says (default:
    classification); normalisation statistics from train only."""
    from sklearn.model_selection import train_test_split

    if task is None:
        from toolchain.tasks import train_task_class

        task = train_task_class()
    if not np.all(np.isfinite(raw.X)):
        raise DataError("data contains NaN or infinite values")
    strat = task.stratify(raw.y, raw.labels)
    idx = np.arange(len(raw.y))
    try:
        rest, test = train_test_split(idx, test_size=cfg.test_fraction, random_state=seed, stratify=strat)
        val_share = cfg.val_fraction / (1.0 - cfg.test_fraction)
        train, val = train_test_split(rest, test_size=val_share, random_state=seed,
                                      stratify=None if strat is None else strat[rest])
        cal = train[:0]
        cal_share = cfg.calibration_fraction / (1.0 - cfg.test_fraction - cfg.val_fraction)
        # after the split above, so that val and test stay what they were; a split too small to fit routing on
        # is not carved at all (those inputs train instead, and routing is fitted on the validation split)
        if round(cal_share * len(train)) >= MIN_CALIBRATION_ROWS:
            inner = None
            if strat is not None:
                counts = np.bincount(strat[train])
                inner = strat[train] if counts[counts > 0].min() >= 2 else None  # a rare class: not stratified
            train, cal = train_test_split(train, test_size=cal_share, random_state=seed, stratify=inner)
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
        resize=raw.resize,
    )
    return Splits(
        train=(raw.X[train], raw.y[train]),
        val=(raw.X[val], raw.y[val]),
        test=(raw.X[test], raw.y[test]),
        input_spec=spec,
        labels=raw.labels,
        sha256=raw.sha256,
        calibration=(raw.X[cal], raw.y[cal]),
    )


def load_splits(cfg: DataConfig, *, seed: int, task: "type[TrainTask] | None" = None) -> Splits:
    return split(load_source(cfg), cfg, seed=seed, task=task)


def data_record(
    splits: Splits, cfg: DataConfig, *, seed: int, python_dirs: Iterable[str] = (), task: TaskSpec | None = None,
) -> dict[str, Any]:
    """What ``data.json`` holds: enough to reload the exact same splits (from any directory)."""
    source = cfg.source
    kind, sep, rest = source.partition(":")
    if sep and kind in ("imagefolder", "yolo", "coco"):  # absolute, so the run reloads from any directory
        source = f"{kind}:{Path(rest).resolve()}"
    return {
        "source": source,
        "seed": seed,
        "sha256": splits.sha256,
        "splits": {k: int(len(getattr(splits, k)[1])) for k in ("train", "val", "test")}
        | {"calibration": int(len(splits.calibration[1])) if splits.calibration is not None else 0},
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "calibration_fraction": cfg.calibration_fraction,
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "count": cfg.count,
        "input_spec": splits.input_spec.to_dict(),
        "labels": list(splits.labels),
        "python_dirs": list(python_dirs),
        "task": (task or TaskSpec()).to_dict(),
    }


def splits_from_record(record: dict[str, Any]) -> Splits:
    """Reload the splits ``data.json`` describes; refuse if the data changed."""
    add_import_dirs(record.get("python_dirs") or ())
    try:
        cfg = DataConfig(
            source=str(record["source"]),
            val_fraction=float(record["val_fraction"]),
            test_fraction=float(record["test_fraction"]),
            calibration_fraction=float(record.get("calibration_fraction", 0.0)),  # runs made before it: none
            image_size=int(record.get("image_size", 32)),
            channels=int(record.get("channels", 3)),
            count=int(record.get("count", DataConfig.count)),
        )
        seed = int(record["seed"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"data.json is incomplete: {e}") from e
    from toolchain.tasks import train_task_class

    task = train_task_class(str((record.get("task") or {}).get("name") or "classify"))
    splits = load_splits(cfg, seed=seed, task=task)
    if splits.sha256 != record.get("sha256"):
        raise DataError(
            f"data source {cfg.source!r} changed since the run was made (sha256 {splits.sha256[:12]} != "
            f"{str(record.get('sha256'))[:12]})"
        )
    return splits


def with_refresh(splits: Splits, path: Path, sha256: str | None, task: "TrainTask | None" = None) -> Splits:
    """The splits plus a refresh set (``toolchain refresh``): its train part appended to train, its held-out
    part to val; test stays the source's own (the regression gate's yardstick). ``task`` joins the targets
    (`TrainTask.concat_targets`; plain concatenation when None)."""
    join = task.concat_targets if task is not None else (lambda *ys: np.concatenate(ys))
    try:
        with np.load(path) as z:
            parts = {k: z[k] for k in ("x_train", "y_train", "x_val", "y_val")}
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"refresh set {path}: unreadable ({e})") from e
    if sha256 is not None and refresh_digest(parts) != sha256:
        raise DataError(f"refresh set {path} changed since the run was made (sha256 mismatch)")
    return Splits(
        train=(np.concatenate([splits.train[0], parts["x_train"]]), join(splits.train[1], parts["y_train"])),
        val=(np.concatenate([splits.val[0], parts["x_val"]]), join(splits.val[1], parts["y_val"])),
        test=splits.test, input_spec=splits.input_spec, labels=splits.labels, sha256=splits.sha256,
        calibration=splits.calibration,
    )


def refresh_digest(parts: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in ("x_train", "y_train", "x_val", "y_val"):
        a = np.ascontiguousarray(parts[k])
        h.update(k.encode() + str(a.shape).encode() + str(a.dtype).encode() + a.tobytes())
    return h.hexdigest()
