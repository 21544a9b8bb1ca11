"""``toolchain compress``: the teacher through a list of compression passes into the student.

The passes are named in ``compress.passes`` (default ``["prune", "distill",
"qat"]``; ``["distill"]`` or ``["prune", "ptq"]`` work too) and live in
`toolchain.passes`, one module each, with their own config section and report
row. The student starts as a copy of the teacher (``student.family =
"teacher"``) or, for another family, as a fresh model built from ``[student]``;
then it also compresses the pruned teacher with the same fp32 passes and
reports it beside. Nothing in the run directory changes until every pass has
run: then student.pt (the last fp32 student), student_qat.pt (the quantized
program, when a quantizing pass ran) and reports/compress.json are written,
and the export outputs, now stale, are removed.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolchain.config import Config
from toolchain.passes import get_pass
from toolchain.passes.base import Pass, PassContext, stage_row, state_size
from toolchain.rundir import RunDir, save_checkpoint

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@dataclass
class PassesResult:
    """What running a pass list produced: table rows, report sections, the models."""

    student: "nn.Module"
    rows: list[dict[str, Any]] = field(default_factory=list)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    quantized: "nn.Module | None" = None
    program: bytes | None = None
    quantizer: str | None = None  # name of the quantizing pass that ran


def run_passes(passes: list[Pass], student: "nn.Module", ctx: PassContext, *, label: str = "") -> PassesResult:
    """Run ``passes`` in order on ``student``; each adds one row (stage prefixed by ``label``)."""
    res = PassesResult(student=student)
    for p in passes:
        out, seconds = p.run(res.student, ctx)
        res.sections[p.name] = out.summary
        stage = f"{label}{p.stage_for(out.summary)}"
        if p.quantizes:

            res.quantized, res.program, res.quantizer = out.model, out.program, p.name
            last = res.rows[-1] if res.rows else stage_row("", res.student, ctx, size=0, seconds=0)
            res.rows.append({**last, "stage": stage, "size_bytes": len(out.program or b""), "quantized": True,
                             "test_accuracy": ctx.metric(out.model, ctx.test), "seconds": round(seconds, 2)})
        else:
            res.student = out.model
            res.rows.append(stage_row(stage, out.model, ctx, size=state_size(out.model), seconds=seconds))
    return res


def make_context(cfg: Config, run: RunDir) -> PassContext:
    """Load the run's teacher and splits (normalised tensors) into a pass context.

    The context's config has the teacher's training recipe (`toolchain.recipes`) on every key ``cfg`` did not
    set; ``ctx.recipe`` records it."""
    import torch

    from toolchain import engine, recipes
    from toolchain.models import count_macs, count_params

    teacher = run.load_teacher()
    cfg, recipe = recipes.resolve(cfg, teacher)
    splits = run.splits()
    spec = splits.input_spec

    def tensors(split: tuple[Any, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return engine.normalise(split[0], spec), torch.from_numpy(split[1])

    shape = spec.sample_shape
    return PassContext(
        cfg=cfg, teacher=teacher, train=tensors(splits.train), val=tensors(splits.val), test=tensors(splits.test),
        input_shape=shape, num_classes=splits.num_classes, augment=cfg.train.augment and len(shape) == 3,
        teacher_params=count_params(teacher), teacher_macs=count_macs(teacher, shape),
        run_dir=run.path, input_spec=spec, labels=tuple(splits.labels), task=run.task, recipe=recipe,
    )


def make_student(cfg: Config, ctx: PassContext) -> "nn.Module":
    """A copy of the teacher, or a fresh model of ``student.family`` (same input and classes).

    Either way torch's transformer layers are replaced by their unfused equivalents (`toolchain.attention`):
    same outputs, whole heads prunable, no fused operator for the exporters and converters to meet."""
    if cfg.student.family == "teacher":
        return _unfused(copy.deepcopy(ctx.teacher).train(), ctx)
    return _unfused(ctx.train_task.build_model(cfg.student, input_shape=ctx.input_shape,
                                               num_classes=ctx.num_classes, what="student.family"), ctx)


def _unfused(model: "nn.Module", ctx: PassContext) -> "nn.Module":
    import torch

    from toolchain.attention import unfuse

    return unfuse(model, torch.randn(2, *ctx.input_shape))


def compress(cfg: Config, run_dir: Path | str | None = None, *, show: bool = True) -> dict[str, Any]:
    """Run the configured passes on the teacher of ``run_dir``; returns the compress report."""
    from toolchain import engine

    t0 = time.perf_counter()
    run = RunDir(run_dir if run_dir is not None else cfg.run.dir)
    engine.set_seed(cfg.run.seed)
    ctx = make_context(cfg, run)
    cfg = ctx.cfg  # with the teacher's training recipe
    teacher_acc = ctx.metric(ctx.teacher, ctx.test)
    rows = [stage_row("teacher", ctx.teacher, ctx, size=run.file(RunDir.TEACHER).stat().st_size, seconds=0.0,
                      accuracy=teacher_acc)]
    passes = [get_pass(name)(cfg) for name in cfg.compress.passes]
    student = make_student(cfg, ctx)
    alternatives = []
    if cfg.student.family != "teacher":
        rows.append(stage_row(f"student ({cfg.student.family}, untrained)", student, ctx,
                              size=state_size(student), seconds=0.0))
        if cfg.student.compare:
            alternatives.append(_pruned_teacher(passes, ctx))
    res = run_passes(passes, student, ctx)
    rows += res.rows
    report = _report(cfg, run, ctx, res, rows=rows, teacher_acc=teacher_acc, alternatives=alternatives)
    report["control"] = _control(cfg, ctx, res, report)
    _write_outputs(run, res, ctx, report)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    run.write_report("compress", report)
    if show:
        from toolchain.report import print_compress

        print_compress(report)
    return report


def _pruned_teacher(passes: list[Pass], ctx: PassContext) -> dict[str, Any]:
    """The default student (the teacher, through the same fp32 passes), for the table."""
    fp32 = [p for p in passes if not p.quantizes]
    res = run_passes(fp32, _unfused(copy.deepcopy(ctx.teacher).train(), ctx), ctx, label="pruned teacher: ")
    return {"name": "pruned teacher", "passes": [p.name for p in fp32], "stages": res.rows,
            "test_accuracy": res.rows[-1]["test_accuracy"] if res.rows else None}


def _control(cfg: Config, ctx: PassContext, res: PassesResult, report: dict[str, Any]) -> dict[str, Any]:
    """The scratch control (compress.control), its row added to the report's alternatives."""
    from toolchain.config import Control
    from toolchain.passes.control import epoch_budget, scratch_control

    if cfg.compress.control is Control.NONE:
        return {"kind": "none"}
    budget = epoch_budget(res.sections, cfg)
    if budget <= 0:
        return {"kind": "scratch", "skipped": "no training pass ran (nothing to compare with)"}
    control = scratch_control(res.student, ctx, budget=budget, student_accuracy=report["student_accuracy"],
                              sections=res.sections)
    row = control.pop("row")
    report["alternatives"].append({"name": "scratch control", "passes": [], "stages": [row],
                                   "test_accuracy": row["test_accuracy"]})
    return control


def _report(cfg: Config, run: RunDir, ctx: PassContext, res: PassesResult, *, rows: list[dict[str, Any]],
            teacher_acc: float, alternatives: list[dict[str, Any]]) -> dict[str, Any]:
    from toolchain.models import count_macs, count_params

    fp32_rows = [r for r in res.rows if not r.get("quantized")]
    quant = res.sections.get(res.quantizer or "", {})
    return {
        "command": "compress",
        "run_dir": str(run.path),
        "passes": list(cfg.compress.passes),
        "student_family": cfg.student.family,
        "recipe": ctx.recipe,
        "stages": rows,
        **res.sections,
        "macs_reduction": ctx.teacher_macs / max(count_macs(res.student, ctx.input_shape), 1),
        "params_reduction": ctx.teacher_params / max(count_params(res.student), 1),
        "quantization": res.quantizer,
        "qdq_weight_bits": quant.get("weight_bits"),
        "teacher_accuracy": teacher_acc,
        "student_accuracy": fp32_rows[-1]["test_accuracy"] if fp32_rows else rows[-1]["test_accuracy"],
        "qat_accuracy": res.rows[-1]["test_accuracy"] if res.quantizer else None,
        "alternatives": alternatives,
    }


def _write_outputs(run: RunDir, res: PassesResult, ctx: PassContext, report: dict[str, Any]) -> None:
    """student.pt, student_qat.pt (or its removal), stale exports removed; fp32 row sizes from disk."""
    size = save_checkpoint(run.file(RunDir.STUDENT), {
        "kind": "student", "model": res.student, "state_dict": res.student.state_dict(),
        "input_shape": list(ctx.input_shape), "num_classes": ctx.num_classes,
        "test_accuracy": report["student_accuracy"],
    })
    fp32 = [r for r in report["stages"] if not r.get("quantized")]
    if len(fp32) > 1:
        fp32[-1]["size_bytes"] = size
    qat_path = run.file(RunDir.STUDENT_QAT)
    if res.program is not None:
        from edgecore.fsutil import atomic_write_bytes

        atomic_write_bytes(qat_path, res.program)
    else:
        qat_path.unlink(missing_ok=True)
    for name in (RunDir.STUDENT_ONNX, RunDir.STUDENT_QDQ, "reports/export.json"):
        (run.path / name).unlink(missing_ok=True)
