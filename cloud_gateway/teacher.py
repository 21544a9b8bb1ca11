"""The heavy model the gateway answers with: the teacher, as ONNX or PyTorch.

ONNX (``RUN/teacher.onnx`` or any ``.onnx``) runs with onnxruntime and needs
no torch; a ``.pt`` teacher is loaded through the run directory's API
(imported lazily, so a gateway serving ONNX never imports torch).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgecore.errors import ConfigError, GatewayError
from edgecore.tasks import Task, get_task

log = logging.getLogger(__name__)


@dataclass
class Teacher:
    name: str
    version: str
    sample_shape: tuple[int, ...]
    labels: list[str]
    _run: Callable[[np.ndarray], np.ndarray]
    labels_source: str = "given"  # where the labels came from; numbered ones say why (the gateway's health shows it)
    task: Task = field(default_factory=get_task)  # reads its outputs (the run's task; classification by default)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._run(batch), dtype=np.float32)


def _labels_from_run(run_dir: Path | None, out_shape: tuple[int, ...], task: Task) -> tuple[list[str], str]:
    """The class labels from ``run_dir/data.json`` and where they came from; numbered 0..n-1 (``n``: the last
    axis of one input's output, ``out_shape``) when there is none.

    A ``data.json`` that is there but unreadable, or names labels the teacher's output does not fit (the task's
    `Task.output_shape` for that many labels: a classifier's class count, a detector's whole raw output), is not
    silently replaced: the numbered labels come with a warning (logged once, here) and a source that says why.
    """
    n = int(out_shape[-1])
    numbered = [str(i) for i in range(n)]
    path = None if run_dir is None else run_dir / "data.json"
    if path is None or not path.exists():
        return numbered, f"numbered 0..{n - 1} (no data.json beside the teacher)"
    try:
        labels = json.loads(path.read_text()).get("labels")
    except (OSError, ValueError, AttributeError) as e:
        why = f"{path} is unreadable ({type(e).__name__}: {e})"
    else:
        if labels and tuple(task.output_shape(len(labels))) == tuple(out_shape):
            return [str(x) for x in labels], str(path)
        why = (f"{path} names {len(labels)} labels for a teacher with outputs of shape {tuple(out_shape)}"
               if labels else f"{path} has no labels")
    log.warning("teacher labels: %s; answering with class numbers 0..%d", why, n - 1)
    return numbered, f"numbered 0..{n - 1}: {why}"


def _task_of_run(run_dir: Path | None) -> Task:
    """The task ``RUN/data.json`` names; classification when there is no readable one (its labels' warning,
    logged once by `_labels_from_run`, says why) or it names none. A task this gateway does not know is refused."""
    path = None if run_dir is None else run_dir / "data.json"
    try:
        record = json.loads(path.read_text()) if path is not None and path.exists() else {}
    except (OSError, ValueError):
        record = {}
    try:
        return get_task(record.get("task") if isinstance(record, dict) else None)
    except ConfigError as e:
        raise GatewayError(f"{path}: {e}") from e


def load_onnx_teacher(path: Path, *, threads: int | None = None, labels: list[str] | None = None) -> Teacher:
    import onnxruntime as ort

    from edgecore.bundle import sha256_file

    opts = ort.SessionOptions()
    # No spin-waiting: ORT's idle threads otherwise burn the cores the MQTT threads need (issue #11:
    # default threads cost 40% of the capacity). One thread unless asked: a gateway serves small batches.
    opts.intra_op_num_threads = threads or 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise GatewayError(f"cannot load teacher {path}: {e}") from e
    inp = sess.get_inputs()[0]
    out = sess.get_outputs()[0]
    shape = tuple(int(d) if isinstance(d, int) else -1 for d in inp.shape[1:])
    if any(d < 0 for d in shape):
        raise GatewayError(f"teacher {path}: input {inp.name} needs a fixed sample shape, has {inp.shape}")
    probe = sess.run([out.name], {inp.name: np.zeros((1, *shape), np.float32)})[0]
    task = _task_of_run(path.parent)
    found, source = (labels, "given") if labels else _labels_from_run(path.parent, tuple(probe.shape[1:]), task)
    return Teacher(
        name=path.stem,
        version=sha256_file(path)[:12],
        sample_shape=shape,
        labels=found,
        _run=lambda x: sess.run([out.name], {inp.name: x})[0],
        labels_source=source,
        task=task,
    )


def load_torch_teacher(run_dir: Path, *, threads: int | None = None) -> Teacher:
    import torch  # cloud side only

    from toolchain.rundir import RunDir

    run = RunDir(run_dir)
    model = run.load_teacher()
    data = json.loads((run_dir / "data.json").read_text())
    shape = tuple(int(d) for d in data["input_spec"]["shape"][1:])

    if threads:
        torch.set_num_threads(threads)

    def _run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.require(x, np.float32, ["C", "W"]))).numpy()

    labels = [str(v) for v in data.get("labels", [])]
    version = (run.lineage().get("teacher_sha256") or "unknown")[:12]
    return Teacher("teacher", version, shape, labels, _run, labels_source=str(run_dir / "data.json"),
                   task=get_task(data.get("task")))


def load_teacher(path: str | Path, *, threads: int | None = None, prefer: str = "onnx") -> Teacher:
    """A run dir (``teacher.onnx`` preferred, else ``teacher.pt``; ``prefer="torch"`` flips it), or an ``.onnx``."""
    p = Path(path)
    if prefer not in ("onnx", "torch"):
        raise GatewayError(f"teacher format {prefer!r}: choose onnx or torch")
    if p.is_file() and p.suffix == ".onnx":
        return load_onnx_teacher(p, threads=threads)
    if p.is_dir():
        if prefer == "onnx" and (p / "teacher.onnx").exists():
            return load_onnx_teacher(p / "teacher.onnx", threads=threads)
        if (p / "teacher.pt").exists():
            return load_torch_teacher(p, threads=threads)
        if (p / "teacher.onnx").exists():
            return load_onnx_teacher(p / "teacher.onnx", threads=threads)
    raise GatewayError(f"{p}: no teacher found (give a run dir with teacher.onnx/teacher.pt, or an .onnx file)")
