"""``toolchain compress``: teacher -> pruned -> distilled -> QAT student.

Three passes, each with its typed config section:

1. **prune** (torch-pruning): structured channel pruning to a MACs or params
   ratio. The uniform per-layer channel ratio that reaches the target is found
   by bisection on a copy, then applied in ``prune.steps`` iterative steps,
   each followed by fine-tuning. Unreachable targets are a `CompressionError`.
2. **distill**: knowledge distillation from the *unpruned* teacher.
3. **qat** (torchao pt2e): the student is exported with a dynamic batch
   dimension (a static one trips a batch-size guard when training), prepared
   with `toolchain.quantizer` (ORT's QDQ placement; uint8 activations, int8
   per-channel weights, or 7-bit weights (±63) for CPUs without VNNI), fine-tuned, converted. The converted
   program is saved as student_qat.pt; ``export`` turns it into QDQ ONNX.
"""

from __future__ import annotations

import copy
import io
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecore.errors import CompressionError
from toolchain.config import Config, PruneTarget, QdqWeightBits
from toolchain.rundir import RunDir, save_checkpoint

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


def cpu_has_vnni(cpuinfo: str | None = None) -> bool:
    """VNNI lets ORT's int8 kernels accumulate u8*s8 without 16-bit saturation."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False  # unknown CPU: the safe choice is reduced range
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def resolve_weight_bits(setting: QdqWeightBits, *, cpuinfo: str | None = None) -> int:
    if setting is QdqWeightBits.SEVEN:
        return 7
    if setting is QdqWeightBits.EIGHT:
        return 8
    return 8 if cpu_has_vnni(cpuinfo) else 7


def _output_layers(model: "nn.Module", num_classes: int) -> list["nn.Module"]:
    """Layers whose outputs are the logits: never pruned."""
    from torch import nn

    out = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    out += [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]
    return out


def _measure(model: "nn.Module", input_shape: tuple[int, ...], target: PruneTarget) -> int:
    from toolchain.models import count_macs, count_params

    return count_macs(model, input_shape) if target is PruneTarget.MACS else count_params(model)


def _make_pruner(model: "nn.Module", *, input_shape: tuple[int, ...], ratio: float, steps: int, num_classes: int,
                 importance: str, max_ratio: float) -> Any:
    import torch
    import torch_pruning as tp

    imp = tp.importance.MagnitudeImportance(p=1 if importance == "l1" else 2)
    return tp.pruner.MetaPruner(
        model,
        torch.zeros(1, *input_shape),
        importance=imp,
        pruning_ratio=ratio,
        max_pruning_ratio=max_ratio,
        iterative_steps=steps,
        ignored_layers=_output_layers(model, num_classes),
        global_pruning=False,
    )


def find_pruning_ratio(model: "nn.Module", *, input_shape: tuple[int, ...], num_classes: int, target: PruneTarget,
                       goal: float, importance: str, max_ratio: float) -> tuple[float, int]:
    """Smallest uniform channel ratio whose pruned copy is ``goal`` times smaller.

    Returns (ratio, measured size). Raises CompressionError when even
    ``max_ratio`` does not reach the goal.
    """
    base = _measure(model, input_shape, target)
    want = base / goal

    def pruned_size(r: float) -> int:
        m = copy.deepcopy(model).eval()
        _make_pruner(m, input_shape=input_shape, ratio=r, steps=1, num_classes=num_classes,
                     importance=importance, max_ratio=max_ratio).step()
        return _measure(m, input_shape, target)

    # Channel rounding makes size non-monotone near max_ratio on tiny layers (a
    # layer that would drop to 0 channels is skipped): scan a grid, then bisect.
    grid = [round(max_ratio * k / 10, 4) for k in range(1, 11)]
    sizes = [pruned_size(r) for r in grid]
    ok = [i for i, s in enumerate(sizes) if s <= want]
    if not ok:
        smallest = min(sizes)
        raise CompressionError(
            f"pruning target unreachable: {goal:g}x fewer {target.value} needs <= {want:,.0f}, but the most "
            f"pruning up to {max_ratio:.0%} of each layer's channels reaches is {smallest:,} "
            f"({base / max(smallest, 1):.1f}x); lower prune.ratio or use a larger teacher"
        )
    i = ok[0]
    lo, hi, best = (grid[i - 1] if i > 0 else 0.0), grid[i], (grid[i], sizes[i])
    for _ in range(6):
        mid = (lo + hi) / 2
        size = pruned_size(mid)
        if size <= want:
            hi, best = mid, (mid, size)
        else:
            lo = mid
    return best


def _state_size(model: "nn.Module") -> int:
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(buf.getvalue())


def compress(cfg: Config, run_dir: Path | str | None = None, *, show: bool = True) -> dict[str, Any]:
    """Prune, distill and QAT the teacher of ``run_dir``; returns the compress report."""
    import torch

    from toolchain import engine
    from toolchain.models import count_macs, count_params

    t0 = time.perf_counter()
    run = RunDir(run_dir if run_dir is not None else cfg.run.dir)
    engine.set_seed(cfg.run.seed)
    teacher = run.load_teacher()
    splits = run.splits()
    spec = splits.input_spec
    input_shape = spec.sample_shape
    n_classes = splits.num_classes
    Xtr, ytr = engine.normalise(splits.train[0], spec), torch.from_numpy(splits.train[1])
    Xv, yv = engine.normalise(splits.val[0], spec), torch.from_numpy(splits.val[1])
    Xte, yte = engine.normalise(splits.test[0], spec), torch.from_numpy(splits.test[1])
    augment = cfg.train.augment and len(input_shape) == 3
    progress = cfg.train.progress
    stages: list[dict[str, Any]] = []

    def row(name: str, model: "nn.Module", acc: float, size: int, seconds: float) -> None:
        stages.append({
            "stage": name, "params": count_params(model), "macs": count_macs(model, input_shape),
            "size_bytes": size, "test_accuracy": acc, "seconds": round(seconds, 2),
        })

    teacher_acc = engine.accuracy(teacher, Xte, yte)
    row("teacher", teacher, teacher_acc, run.file(RunDir.TEACHER).stat().st_size, 0.0)

    # 1. prune, iteratively, fine-tuning after each step
    t = time.perf_counter()
    p = cfg.prune
    ratio, _ = find_pruning_ratio(
        teacher, input_shape=input_shape, num_classes=n_classes, target=p.target, goal=p.ratio,
        importance=p.importance, max_ratio=p.max_channel_ratio,
    )
    student = copy.deepcopy(teacher).train()
    pruner = _make_pruner(student, input_shape=input_shape, ratio=ratio, steps=p.steps, num_classes=n_classes,
                          importance=p.importance, max_ratio=p.max_channel_ratio)
    for step in range(p.steps):
        student.eval()
        pruner.step()
        if p.finetune_epochs > 0:
            engine.fit(
                student, loss_fn=engine.ce_loss(cfg.train.label_smoothing), train=(Xtr, ytr), val=(Xv, yv),
                opts=engine.FitOptions(
                    epochs=p.finetune_epochs, lr=p.lr, weight_decay=cfg.train.weight_decay,
                    batch_size=cfg.data.batch_size, augment=augment, amp=cfg.train.amp,
                    desc=f"prune {step + 1}/{p.steps}", progress=progress, seed=cfg.run.seed + step,
                ),
            )
    student = student.cpu().eval()
    achieved = _measure(teacher, input_shape, p.target) / max(1, _measure(student, input_shape, p.target))
    if achieved + 1e-9 < p.ratio:
        raise CompressionError(f"pruning reached only {achieved:.2f}x fewer {p.target.value}, target {p.ratio:g}x")
    row("pruned", student, engine.accuracy(student, Xte, yte), _state_size(student), time.perf_counter() - t)

    # 2. distill from the unpruned teacher
    t = time.perf_counter()
    d = cfg.distill
    if d.epochs > 0:
        engine.fit(
            student,
            loss_fn=engine.distill_loss(teacher, temperature=d.temperature, alpha=d.alpha,
                                        label_smoothing=cfg.train.label_smoothing),
            train=(Xtr, ytr), val=(Xv, yv),
            opts=engine.FitOptions(
                epochs=d.epochs, lr=d.lr, weight_decay=cfg.train.weight_decay, warmup_epochs=0,
                patience=d.patience, batch_size=cfg.data.batch_size, augment=augment, amp=cfg.train.amp,
                desc="distill", progress=progress, seed=cfg.run.seed + 100,
            ),
        )
    student = student.cpu().eval()
    student_acc = engine.accuracy(student, Xte, yte)
    size = save_checkpoint(run.file(RunDir.STUDENT), {
        "kind": "student", "model": student, "state_dict": student.state_dict(),
        "input_shape": list(input_shape), "num_classes": n_classes, "test_accuracy": student_acc,
    })
    row("distilled", student, student_acc, size, time.perf_counter() - t)

    # 3. quantization-aware training (torchao pt2e)
    t = time.perf_counter()
    bits = resolve_weight_bits(cfg.qat.weight_bits)
    converted, qat_val = quantization_aware_training(
        student, teacher=teacher, cfg=cfg, bits=bits, train=(Xtr, ytr), val=(Xv, yv), augment=augment,
    )
    qat_acc = engine.accuracy(converted, Xte, yte)
    qat_size = save_qat_program(run.file(RunDir.STUDENT_QAT), converted, input_shape)
    stages.append({
        "stage": "qat", "params": stages[-1]["params"], "macs": stages[-1]["macs"], "size_bytes": qat_size,
        "test_accuracy": qat_acc, "seconds": round(time.perf_counter() - t, 2),
    })

    tm, sm = stages[0]["macs"], stages[2]["macs"]
    tp_, sp = stages[0]["params"], stages[2]["params"]
    report: dict[str, Any] = {
        "command": "compress",
        "run_dir": str(run.path),
        "stages": stages,
        "prune": {"target": p.target.value, "ratio_goal": p.ratio, "channel_ratio": round(ratio, 4),
                  "macs_reduction": tm / max(sm, 1), "params_reduction": tp_ / max(sp, 1), "steps": p.steps},
        "distill": {"temperature": d.temperature, "alpha": d.alpha, "epochs": d.epochs},
        "qat": {"epochs": cfg.qat.epochs, "weight_bits": bits, "weight_bits_setting": cfg.qat.weight_bits.value,
                "cpu_vnni": cpu_has_vnni(), "val_accuracy": qat_val},
        "qdq_weight_bits": bits,
        "teacher_accuracy": teacher_acc,
        "student_accuracy": student_acc,
        "qat_accuracy": qat_acc,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    # outputs of export are stale now
    for name in (RunDir.STUDENT_ONNX, RunDir.STUDENT_QDQ, "reports/export.json"):
        (run.path / name).unlink(missing_ok=True)
    run.write_report("compress", report)
    if show:
        from toolchain.report import print_compress

        print_compress(report)
    return report


def make_quantizer(bits: int) -> Any:
    """The QAT quantizer: Q/DQ where CPU runtimes fuse them (see `toolchain.quantizer`)."""
    from toolchain.quantizer import make_quantizer as _make

    return _make(bits)


def _batch_dim() -> Any:
    import torch

    return torch.export.Dim("batch", min=1, max=1 << 16)


def quantization_aware_training(
    student: "nn.Module", *, teacher: "nn.Module", cfg: Config, bits: int,
    train: tuple["torch.Tensor", "torch.Tensor"], val: tuple["torch.Tensor", "torch.Tensor"], augment: bool,
) -> tuple["nn.Module", float]:
    """Returns (converted pt2e module, best fake-quant validation accuracy)."""
    import torch
    import torchao.quantization.pt2e as pt2e
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    from toolchain import engine

    model = copy.deepcopy(student).cpu().train()
    # torchao's train/eval switch rewrites every dropout in an exported graph to
    # p=0.5: drop dropout from the QAT copy (short fine-tune, not needed).
    _strip_dropout(model)
    example = train[0][: min(8, len(train[0]))]
    try:
        graph = torch.export.export(model, (example,), dynamic_shapes=({0: _batch_dim()},)).module()
        prepared = prepare_qat_pt2e(graph, make_quantizer(bits))
    except Exception as e:  # export/prepare failures come in many types
        raise CompressionError(f"QAT: cannot export/prepare the student for quantization: {e}") from e
    pt2e.allow_exported_model_train_eval(prepared)
    q = cfg.qat

    def on_epoch_end(state: engine.FitState) -> None:
        if state.epoch >= q.freeze_observer_epoch:
            prepared.apply(pt2e.disable_observer)

    state = engine.fit(
        prepared,
        loss_fn=engine.distill_loss(teacher, temperature=cfg.distill.temperature, alpha=cfg.distill.alpha),
        train=train, val=val,
        opts=engine.FitOptions(
            epochs=q.epochs, lr=q.lr, weight_decay=0.0, batch_size=cfg.data.batch_size, augment=augment,
            amp=False, desc="qat", progress=cfg.train.progress, seed=cfg.run.seed + 200,
        ),
        on_epoch_end=on_epoch_end,
    )
    pt2e.move_exported_model_to_eval(prepared)
    converted = convert_pt2e(prepared)
    pt2e.allow_exported_model_train_eval(converted)
    return converted, state.best_acc


def _strip_dropout(model: "nn.Module") -> None:
    from torch import nn

    for name, child in list(model.named_children()):
        if isinstance(child, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)):
            setattr(model, name, nn.Identity())
        else:
            _strip_dropout(child)


def save_qat_program(path: Path, converted: "nn.Module", input_shape: tuple[int, ...]) -> int:
    """Save the converted QAT module as a torch.export program (int8 weights inside)."""
    import torch

    from edgecore.fsutil import atomic_write_bytes

    ep = torch.export.export(converted, (torch.zeros(2, *input_shape),), dynamic_shapes=({0: _batch_dim()},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return len(data)
