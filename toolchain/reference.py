"""What every build and verify of a run compares with: its splits and PyTorch logits, computed once."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecore.spec import InputSpec

if TYPE_CHECKING:  # pragma: no cover
    from toolchain.tasks import TrainTask

log = logging.getLogger(__name__)


@dataclass
class Reference:
    """Everything a build compares with, computed once per run (PyTorch side)."""

    run_dir: Path
    input_spec: InputSpec
    labels: tuple[str, ...]
    x_train: np.ndarray  # normalised
    y_train: np.ndarray
    raw_val: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    student_val: np.ndarray
    student_test: np.ndarray
    teacher_val: np.ndarray | None  # the cloud model's logits (None: no teacher in the run)
    macs: int | None
    params: int | None
    lineage: dict[str, Any]
    task: "TrainTask"  # the run's task: its gate, metric and routing quality
    # rows of the val split the drift reference is built from: all (None), or, for a refresh aimed at one
    # device, the collected held-out rows at its end (the distribution that device now sees)
    drift_rows: slice | None = None


_REFERENCES: dict[tuple[str, float, float], Reference] = {}


def _torch_logits(model: Any, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size]))).float().numpy())
    return np.concatenate(out)


def _drift_rows(record: dict[str, Any]) -> slice | None:
    r = record.get("refresh") or {}
    return slice(-int(r["val"]), None) if r.get("drift_from") == "collected" and int(r.get("val", 0)) > 0 else None


def reference_for(run_dir: Path) -> Reference:
    """The run's splits and PyTorch logits (cached per process while the checkpoints are unchanged)."""
    from toolchain.rundir import RunDir

    run = RunDir(run_dir)
    student_p = run.require(RunDir.STUDENT, hint="run `toolchain compress` first")
    teacher_p = run.path / RunDir.TEACHER
    key = (str(run.path.resolve()), student_p.stat().st_mtime, teacher_p.stat().st_mtime if teacher_p.exists() else 0.0)
    if key in _REFERENCES:
        return _REFERENCES[key]
    splits = run.splits()
    spec = splits.input_spec
    student = run.load_student()
    x_train, x_val, x_test = (spec.preprocess(s[0]) for s in (splits.train, splits.val, splits.test))
    teacher_val = _torch_logits(run.load_teacher(), x_val) if teacher_p.exists() else None
    macs = params = None
    try:
        from toolchain.models import count_macs, count_params

        params = count_params(student)
        macs = count_macs(student, spec.sample_shape)
    except Exception as e:  # counting is informative only; never fail a build on it
        log.debug("MAC/param count failed: %s", e)
    lineage = dict(run.lineage())
    lineage["run_dir"] = str(run.path.resolve())
    ref = Reference(
        run_dir=run.path, input_spec=spec, labels=tuple(splits.labels), x_train=x_train, y_train=splits.train[1],
        raw_val=splits.val[0], x_val=x_val, y_val=splits.val[1], x_test=x_test, y_test=splits.test[1],
        student_val=_torch_logits(student, x_val), student_test=_torch_logits(student, x_test),
        teacher_val=teacher_val, macs=macs, params=params, lineage=lineage, task=run.task,
        drift_rows=_drift_rows(run.data_record()),
    )
    _REFERENCES.clear()
    _REFERENCES[key] = ref
    return ref
