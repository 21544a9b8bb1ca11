"""What every build and verify of a run compares with: its splits and PyTorch logits, computed once."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecore.spec import InputSpec
from toolchain.data import MIN_CALIBRATION_ROWS

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
    # the split routing is fitted on (temperature, threshold, edge-vs-cloud, drift reference): the calibration
    # split, which no stage selected a checkpoint on, when the run has one (and not a device refresh's rows)
    raw_fit: np.ndarray
    x_fit: np.ndarray
    y_fit: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    student_fit: np.ndarray
    student_test: np.ndarray
    teacher_fit: np.ndarray | None  # the cloud model's outputs on it (None: no teacher in the run)
    macs: int | None
    params: int | None
    lineage: dict[str, Any]
    task: "TrainTask"  # the run's task: its gate, metric and routing quality
    # rows of the fit split the drift reference is built from: all (None), or, for a refresh aimed at one
    # device, the collected held-out rows at the end of its validation split (what that device now sees)
    drift_rows: slice | None = None
    fit_split: str = "calibration"  # "calibration" | "validation" (selection-biased: no calibration split)


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


def _fit_split(splits: Any, drift_rows: slice | None) -> tuple[str, tuple[np.ndarray, np.ndarray]]:
    """What routing is fitted on: the calibration split, or the validation split where the run has too small a
    calibration split (``data.calibration_fraction = 0``, runs made before it) or is a device refresh (its
    collected held-out inputs sit at the end of the validation split)."""
    cal = splits.calibration
    if drift_rows is None and cal is not None and len(cal[1]) >= MIN_CALIBRATION_ROWS:
        return "calibration", cal
    return "validation", splits.val


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
    drift_rows = _drift_rows(run.data_record())
    fit_split, fit = _fit_split(splits, drift_rows)
    x_train, x_fit, x_test = (spec.preprocess(s[0]) for s in (splits.train, fit, splits.test))
    teacher_fit = _torch_logits(run.load_teacher(), x_fit) if teacher_p.exists() else None
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
        raw_fit=fit[0], x_fit=x_fit, y_fit=fit[1], x_test=x_test, y_test=splits.test[1],
        student_fit=_torch_logits(student, x_fit), student_test=_torch_logits(student, x_test),
        teacher_fit=teacher_fit, macs=macs, params=params, lineage=lineage, task=run.task,
        drift_rows=drift_rows, fit_split=fit_split,
    )
    _REFERENCES.clear()
    _REFERENCES[key] = ref
    return ref
