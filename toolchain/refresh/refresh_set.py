"""The refresh set (collected samples made into training and held-out parts) and the new run that carries it."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecore.fsutil import atomic_write_bytes
from edgecore.samples import Sample

from .errors import RefreshError

if TYPE_CHECKING:  # pragma: no cover
    from toolchain.tasks import TrainTask

REFRESH_FILE = "refresh/refresh_set.npz"
_SKIP = ("bundles", "checkpoints", "latency", "refresh", "reports")


@dataclass
class RefreshSet:
    x_train: np.ndarray  # raw (un-normalised), like every split of a run
    y_train: np.ndarray
    x_val: np.ndarray  # the held-out collected samples
    y_val: np.ndarray
    p_train: np.ndarray  # soft targets of the train part the task's loss reads (a classifier: a person's label
    #                      one-hot, else the teacher's probabilities); (rows, 0) when it reads none
    w_train: np.ndarray  # loss weight per train sample (balance "weight": each class the same total, mean 1; else 1)
    ids_train: list[int]
    ids_holdout: list[int]
    duplicates: int
    human_labels: int
    sha256: str
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)  # the task's (`RefreshTargets.notes`)


def _raw(x: np.ndarray, spec: Any) -> np.ndarray:
    """Undo ``InputSpec.preprocess`` (samples hold what the device's model took)."""
    x = np.asarray(x, np.float32)
    if spec.mean:
        b = (1, len(spec.mean)) + (1,) * (x.ndim - 2)
        x = x * np.asarray(spec.std, np.float32).reshape(b) + np.asarray(spec.mean, np.float32).reshape(b)
    return (x / np.float32(spec.scale)).astype(np.float32)


def build_refresh_set(samples: list[Sample], spec: Any, num_classes: int, *, holdout: float, seed: int,
                      balance: Any, min_samples: int, task: "TrainTask | None" = None,
                      min_box_score: float = 0.5) -> RefreshSet:
    """Distinct samples (by content; a labelled copy preferred), a seeded ``holdout`` share held out, the targets
    the run's task makes of them (`TrainTask.refresh_targets`; classification when ``task`` is None).

    ``balance``: a `toolchain.config.Balance` or its value (an older config's boolean is mapped when it loads);
    ``min_box_score``: a detector's teacher boxes at least this sure are targets."""
    if task is None:
        from toolchain.tasks import get_train_task

        task = get_train_task(None)
    shape = tuple(spec.sample_shape)
    keep: dict[str, Sample] = {}
    for s in samples:
        x = s.input[0] if s.input.ndim == len(shape) + 1 and s.input.shape[0] == 1 else s.input
        if tuple(x.shape) != shape:
            raise RefreshError(f"sample {s.id} from {s.device}: input shape {list(s.input.shape)} does not match the "
                               f"run's {list(shape)} (samples of another model?)")
        key = hashlib.sha256(np.ascontiguousarray(x, np.float32).tobytes()).hexdigest()
        if key not in keep or (_by_person(s) and not _by_person(keep[key])):
            keep[key] = dataclasses.replace(s, input=np.asarray(x, np.float32))
    uniq = sorted(keep.values(), key=lambda s: s.id)
    if len(uniq) < min_samples:
        raise RefreshError(f"{len(uniq)} distinct collected samples (of {len(samples)}); refresh.min_samples is "
                           f"{min_samples}: collect longer (cloud-gateway serve --collect ...)")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    n_hold = max(1, int(round(holdout * len(uniq))))
    hold, train = [uniq[i] for i in order[:n_hold]], [uniq[i] for i in order[n_hold:]]
    t = task.refresh_targets(train, hold, num_classes=num_classes, balance=balance, min_box_score=min_box_score,
                             rng=rng)
    idx = t.order
    x_tr = _raw(np.stack([train[i].input for i in idx]), spec) if len(idx) else np.zeros((0, *shape), np.float32)
    parts = {"x_train": x_tr, "y_train": t.y_train, "x_val": _raw(np.stack([s.input for s in hold]), spec),
             "y_val": t.y_val}
    from toolchain.data import refresh_digest

    return RefreshSet(**parts, p_train=t.p_train, w_train=t.w_train, ids_train=[s.id for s in train],
                      ids_holdout=[s.id for s in hold], duplicates=len(samples) - len(uniq),
                      human_labels=sum(_by_person(s) for s in uniq), sha256=refresh_digest(parts), notes=t.notes)


def _by_person(s: Sample) -> bool:
    return s.human_label is not None or s.human_answer is not None


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
