"""``toolchain export``: student.onnx, student_qdq.onnx, teacher.onnx.

Every graph is exported with the dynamo exporter (dynamic batch, input
"input", output "logits", weights inside the file), passes ``onnx.checker``,
and is run in ONNX Runtime on the test split against its PyTorch source: fp32
graphs must match within ``export.atol``; the QDQ graph must agree with the
converted QAT program on at least ``export.min_agreement`` of the inputs (ORT
fuses QDQ into integer kernels, so tiny rounding differences are expected).
What "agree" means is the task's (`TrainTask.export_check`: top-1 for
classification, boxes for detection).
All mismatches are collected and reported in one `ExportError`. A file is
renamed into place only after it passed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecore.errors import ExportError
from toolchain.config import Config
from toolchain.rundir import RunDir

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from torch import nn

    from toolchain.tasks import TrainTask


def export_onnx(model: "nn.Module", path: Path, *, input_shape: tuple[int, ...], opset: int) -> None:
    """Dynamo export to ``path`` (a single self-contained file)."""
    import logging
    import warnings

    import torch

    example = torch.zeros(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (example,), dynamo=True, external_data=False, opset_version=opset,
                input_names=["input"], output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False,
            )
            program.save(str(path), external_data=False)
    except Exception as e:  # the exporter raises many types
        raise ExportError(f"ONNX export of {path.name} failed: {type(e).__name__}: {e}") from e


def ort_logits(path: Path, X: "np.ndarray", *, batch_size: int = 256) -> "np.ndarray":
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    outs = [sess.run(["logits"], {"input": X[i : i + batch_size]})[0] for i in range(0, len(X), batch_size)]
    return np.concatenate(outs)


def _qdq_stats(path: Path) -> dict[str, Any]:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    ops = [n.op_type for n in m.graph.node]
    int_max = 0
    for init in m.graph.initializer:
        if init.data_type == onnx.TensorProto.INT8:
            a = numpy_helper.to_array(init)
            if a.size:
                int_max = max(int_max, int(np.abs(a.astype(np.int32)).max()))
    return {"quantize_nodes": ops.count("QuantizeLinear"), "dequantize_nodes": ops.count("DequantizeLinear"),
            "max_abs_int8_weight": int_max}


def _check_and_compare(
    *, name: str, tmp: Path, torch_logits: "np.ndarray", X: "np.ndarray", y: "np.ndarray",
    atol: float | None, min_agreement: float | None, problems: list[str], task: "TrainTask",
) -> dict[str, Any]:
    """``onnx.checker``, then the graph on ONNX Runtime against its PyTorch source (the task's comparison)."""
    import onnx

    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except onnx.checker.ValidationError as e:
        problems.append(f"{name}: onnx.checker failed: {e}")
    row, found = task.export_check(name, ort_logits(tmp, X), torch_logits, y, atol=atol, min_agreement=min_agreement)
    problems += found
    return {"file": name, "size_bytes": tmp.stat().st_size, **row}


def export(cfg: Config, run_dir: Path | str | None = None, *, show: bool = True) -> dict[str, Any]:
    """Export the run's models to ONNX and validate them; returns the export report."""
    t0 = time.perf_counter()
    run = RunDir(run_dir if run_dir is not None else cfg.run.dir)
    compress_report = run.report("compress")
    models = _export_all(cfg, run)
    bits = (compress_report or {}).get("qdq_weight_bits")
    report: dict[str, Any] = {
        "command": "export",
        "run_dir": str(run.path),
        "opset": cfg.export.opset,
        "models": models,
        "qdq_weight_bits": bits,
        "student_fp32_ort_accuracy": models["student"]["ort_accuracy"],
        "student_qdq_ort_accuracy": models.get("student_qdq", {}).get("ort_accuracy"),
        "teacher_ort_accuracy": models.get("teacher", {}).get("ort_accuracy"),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    run.write_report("export", report)
    if show:
        from toolchain.report import print_export

        print_export(report)
    return report


def _plan(cfg: Config, run: RunDir) -> list[tuple[str, str, Any, float | None, float | None]]:
    """(key, file name, PyTorch model, atol, min agreement) of every graph to export."""
    plan: list[tuple[str, str, Any, float | None, float | None]] = [
        ("student", RunDir.STUDENT_ONNX, run.load_student(), cfg.export.atol, None),
    ]
    if run.file(RunDir.STUDENT_QAT).is_file():  # absent when compress ran no quantizing pass
        plan.append(("student_qdq", RunDir.STUDENT_QDQ, run.load_student_qat(), None, cfg.export.min_agreement))
    if cfg.export.teacher:
        plan.append(("teacher", RunDir.TEACHER_ONNX, run.load_teacher(), cfg.export.atol, None))
    return plan


def _export_all(cfg: Config, run: RunDir) -> dict[str, Any]:
    """Export and check every planned graph in a temporary folder; rename them into place only if all passed."""
    import torch

    from toolchain import engine

    splits = run.splits()
    spec = splits.input_spec
    input_shape = spec.sample_shape
    X = spec.preprocess(splits.test[0])
    y = splits.test[1]
    Xt = torch.from_numpy(X)
    plan = _plan(cfg, run)
    task = run.task
    models: dict[str, Any] = {}
    problems: list[str] = []
    staged: list[tuple[Path, Path]] = []
    with tempfile.TemporaryDirectory(dir=run.path, prefix=".export.") as tmpdir:
        for key, fname, model, atol, min_agree in plan:
            tmp = Path(tmpdir) / fname
            export_onnx(model, tmp, input_shape=input_shape, opset=cfg.export.opset)
            torch_logits = engine.predict(model, Xt).numpy()
            models[key] = _check_and_compare(
                name=fname, tmp=tmp, torch_logits=torch_logits, X=X, y=y, atol=atol, min_agreement=min_agree,
                problems=problems, task=task,
            )
            if key == "student_qdq":
                models[key].update(_qdq_stats(tmp))
                if models[key]["quantize_nodes"] == 0:
                    problems.append(f"{fname}: no QuantizeLinear nodes: the graph is not quantized")
            staged.append((tmp, run.file(fname)))
        if problems:
            raise ExportError("ONNX export does not match PyTorch: " + "; ".join(problems))
        for tmp, final in staged:
            os.replace(tmp, final)
    return models
