"""The refresh set (collected samples made into training and held-out parts) and the new run that carries it."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecore.fsutil import atomic_write_bytes
from edgecore.samples import Sample

from .errors import RefreshError

REFRESH_FILE = "refresh/refresh_set.npz"
_SKIP = ("bundles", "checkpoints", "latency", "refresh", "reports")


@dataclass
class RefreshSet:
    x_train: np.ndarray  # raw (un-normalised), like every split of a run
    y_train: np.ndarray
    x_val: np.ndarray  # the held-out collected samples
    y_val: np.ndarray
    p_train: np.ndarray  # soft targets of the train part: a person's label one-hot, else the teacher's probabilities
    w_train: np.ndarray  # loss weight per train sample (balance "weight": each class the same total, mean 1; else 1)
    ids_train: list[int]
    ids_holdout: list[int]
    duplicates: int
    human_labels: int
    sha256: str


def _raw(x: np.ndarray, spec: Any) -> np.ndarray:
    """Undo ``InputSpec.preprocess`` (samples hold what the device's model took)."""
    x = np.asarray(x, np.float32)
    if spec.mean:
        b = (1, len(spec.mean)) + (1,) * (x.ndim - 2)
        x = x * np.asarray(spec.std, np.float32).reshape(b) + np.asarray(spec.mean, np.float32).reshape(b)
    return (x / np.float32(spec.scale)).astype(np.float32)


def build_refresh_set(samples: list[Sample], spec: Any, num_classes: int, *, holdout: float, seed: int,
                      balance: Any, min_samples: int) -> RefreshSet:
    """``balance``: a `toolchain.config.Balance` or its value (an older config's boolean is mapped when it loads)."""
    from toolchain.config import Balance

    mode = Balance(balance)
    shape = tuple(spec.sample_shape)
    keep: dict[str, Sample] = {}
    for s in samples:
        x = s.input[0] if s.input.ndim == len(shape) + 1 and s.input.shape[0] == 1 else s.input
        if tuple(x.shape) != shape:
            raise RefreshError(f"sample {s.id} from {s.device}: input shape {list(s.input.shape)} does not match the "
                               f"run's {list(shape)} (samples of another model?)")
        if not 0 <= s.label < num_classes:
            raise RefreshError(f"sample {s.id}: label {s.label} outside the run's {num_classes} classes")
        key = hashlib.sha256(np.ascontiguousarray(x, np.float32).tobytes()).hexdigest()
        if key not in keep or (s.human_label is not None and keep[key].human_label is None):
            keep[key] = dataclasses.replace(s, input=np.asarray(x, np.float32))
    uniq = sorted(keep.values(), key=lambda s: s.id)
    if len(uniq) < min_samples:
        raise RefreshError(f"{len(uniq)} distinct collected samples (of {len(samples)}); refresh.min_samples is "
                           f"{min_samples}: collect longer (cloud-gateway serve --collect ...)")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    n_hold = max(1, int(round(holdout * len(uniq))))
    hold, train = [uniq[i] for i in order[:n_hold]], [uniq[i] for i in order[n_hold:]]
    idx = np.arange(len(train))
    y_tr = np.array([s.label for s in train], np.int64)
    w_tr = np.ones(len(train), np.float32)
    counts = np.bincount(y_tr, minlength=num_classes)
    if mode is Balance.OVERSAMPLE and len(train):
        target = counts[counts > 0].max()
        extra = [rng.choice(np.flatnonzero(y_tr == c), target - n) for c, n in enumerate(counts) if 0 < n < target]
        idx = np.concatenate([idx, *extra]) if extra else idx
        w_tr = np.ones(len(idx), np.float32)
    elif mode is Balance.WEIGHT and len(train):
        # every present class weighs the same in total and the weights average 1: the classes are even, and the
        # collected part's share of the training loss stays what was collected (oversampling grows it)
        w_tr = (len(train) / (np.count_nonzero(counts) * counts[y_tr])).astype(np.float32)
    x_tr = _raw(np.stack([train[i].input for i in idx]), spec) if len(idx) else np.zeros((0, *shape), np.float32)
    p_tr = np.stack([_target(train[i], num_classes) for i in idx]) if len(idx) else np.zeros((0, num_classes), np.float32)
    parts = {"x_train": x_tr, "y_train": y_tr[idx] if len(idx) else np.zeros(0, np.int64),
             "x_val": _raw(np.stack([s.input for s in hold]), spec), "y_val": np.array([s.label for s in hold], np.int64)}
    from toolchain.data import refresh_digest

    return RefreshSet(**parts, p_train=p_tr, w_train=w_tr, ids_train=[s.id for s in train],
                      ids_holdout=[s.id for s in hold], duplicates=len(samples) - len(uniq),
                      human_labels=sum(s.human_label is not None for s in uniq), sha256=refresh_digest(parts))


def _target(s: Sample, num_classes: int) -> np.ndarray:
    if s.human_label is not None or s.teacher_probs.shape != (num_classes,):
        return np.eye(num_classes, dtype=np.float32)[s.label]
    p = np.clip(s.teacher_probs.astype(np.float32), 0, None)
    return p / max(float(p.sum()), 1e-12)


def new_run(parent: Path, out: Path, rs: RefreshSet, source: str, device: str | None = None) -> None:
    import io

    from toolchain.rundir import RunDir

    if out.exists() and any(out.iterdir()):
        raise RefreshError(f"{out} exists and is not empty: give a new --out for the refreshed run")
    shutil.copytree(parent, out, ignore=lambda d, names: [n for n in names if Path(d) == parent and n in _SKIP],
                    dirs_exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, x_train=rs.x_train, y_train=rs.y_train, x_val=rs.x_val, y_val=rs.y_val)
    atomic_write_bytes(out / REFRESH_FILE, buf.getvalue())
    run = RunDir(out)
    rec = run.data_record()
    rec["refresh"] = {"file": REFRESH_FILE, "sha256": rs.sha256, "parent": str(parent.resolve()), "source": source,
                      "train": int(len(rs.y_train)), "val": int(len(rs.y_val)),
                      "original_val": int(rec.get("splits", {}).get("val", 0)),
                      # a refresh for one device: its drift reference is what that device now sees (the collected
                      # held-out inputs); for the whole fleet, the mixture (validation split plus them)
                      "drift_from": "collected" if device else "mixture"}
    run.write_data_record(rec)
