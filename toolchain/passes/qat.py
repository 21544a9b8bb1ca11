"""``qat``: quantization-aware training (torchao pt2e), and the quantization helpers PTQ shares.

The student's BatchNorm layers are first folded into the conv/linear before
them (``qat.fold_batchnorm``): the ranges then train on the weights the int8
graph will hold, and torchao's conv-bn pattern rewrite (about 170
``torch.export`` calls of pattern graphs, most of a QAT's time on small models)
is skipped since no BatchNorm is left. The student is exported with a dynamic
batch dimension (a static one trips a batch-size guard when training),
prepared with an x86 quantizer (uint8 activations, int8 per-channel weights,
or 7-bit weights (±63) for CPUs without VNNI), fine-tuned with distillation
from the teacher for ``qat.epochs`` (capped at ``qat.max_steps`` optimizer
steps, so large data sets do not pay for whole epochs), and converted. The
converted program is saved compactly (no stack traces, deflated) as
student_qat.pt; ``export`` turns it into QDQ ONNX.
"""

from __future__ import annotations

import copy
import enum
import io
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecore.errors import CompressionError
from toolchain.passes.base import Pass, PassContext, PassOutput
from toolchain.quantizer import make_quantizer
from toolchain.section import MAX_EPOCHS, Check, Section

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


class QdqWeightBits(str, enum.Enum):
    """Weight range of the QDQ graph: ``auto`` = 8 bits with VNNI, else 7 bits (±63)."""

    AUTO = "auto"
    SEVEN = "7"
    EIGHT = "8"


@dataclass(frozen=True)
class QatConfig(Section):
    epochs: int = 3
    lr: float = 2e-4
    weight_bits: QdqWeightBits = QdqWeightBits.AUTO
    freeze_observer_epoch: int = 2  # after this many QAT epochs the quantization ranges are frozen
    max_steps: int = 600  # cap on optimizer steps (epochs shrink on large data); 0 = no cap
    fold_batchnorm: bool = True  # fold BatchNorm into the conv/linear before it (much faster prepare/convert)

    def validate(self, check: Check) -> None:
        check.count("epochs", low=1, high=MAX_EPOCHS)
        check.need(self.max_steps >= 0, "max_steps", "must be >= 0 (0: no cap)")
        check.count("freeze_observer_epoch", low=1, high=MAX_EPOCHS)


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


#: Largest batch the quantizing passes' exported graphs take (and so the largest ``data.batch_size``).
MAX_BATCH = 1 << 16


def batch_dim() -> Any:
    import torch

    return torch.export.Dim("batch", min=1, max=MAX_BATCH)


def fold_batchnorm(model: "nn.Module") -> tuple[int, int]:
    """Fold each BatchNorm that directly follows a conv/linear in a Sequential; returns (folded, left)."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d)
    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            a, b = seq[i], seq[i + 1]
            if not isinstance(b, bn_types) or b.running_mean is None:
                continue
            if isinstance(a, (nn.Conv1d, nn.Conv2d)) and a.out_channels == b.num_features:
                seq[i] = fuse_conv_bn_eval(a.eval(), b.eval())
            elif isinstance(a, nn.Linear) and a.out_features == b.num_features:
                seq[i] = fuse_linear_bn_eval(a.eval(), b.eval())
            else:
                continue
            seq[i + 1] = nn.Identity()
            folded += 1
    left = sum(isinstance(m, bn_types) for m in model.modules())
    return folded, left


def strip_dropout(model: "nn.Module") -> None:
    """torchao's train/eval switch rewrites every dropout in an exported graph to p=0.5: drop them."""
    from torch import nn

    for name, child in list(model.named_children()):
        if isinstance(child, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)):
            setattr(model, name, nn.Identity())
        else:
            strip_dropout(child)


def export_for_quantization(student: "nn.Module", example: "torch.Tensor", *, fold_bn: bool,
                            train: bool) -> tuple["torch.fx.GraphModule", dict[str, int]]:
    """A copy of ``student`` without dropout (BatchNorm folded if asked), exported with a dynamic batch."""
    import torch

    model = copy.deepcopy(student).cpu().eval()
    folded, left = fold_batchnorm(model) if fold_bn else (0, -1)
    strip_dropout(model)
    model.train(train)
    try:
        graph = torch.export.export(model, (example,), dynamic_shapes=({0: batch_dim()},)).module()
    except Exception as e:  # export failures come in many types
        raise CompressionError(f"quantization: cannot export the student: {type(e).__name__}: {e}") from e
    return graph, {"batchnorm_folded": folded, "batchnorm_left": left}


def serialize_program(converted: "nn.Module", input_shape: tuple[int, ...]) -> bytes:
    """The converted module as a torch.export program: no stack traces, zip entries deflated.

    ``torch.export.load`` reads it as is (about 4x smaller than torch.export.save's stored zip).
    """
    import torch

    ep = torch.export.export(converted, (torch.zeros(2, *input_shape),), dynamic_shapes=({0: batch_dim()},))
    for node in ep.graph.nodes:
        node.meta.pop("stack_trace", None)
    raw = io.BytesIO()
    torch.export.save(ep, raw)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw.getvalue())) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info.filename), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return out.getvalue()


def save_qat_program(path: Path, converted: "nn.Module", input_shape: tuple[int, ...]) -> int:
    """Write `serialize_program` atomically; returns the size in bytes."""
    from edgecore.fsutil import atomic_write_bytes

    data = serialize_program(converted, input_shape)
    atomic_write_bytes(path, data)
    return len(data)


def qat_epochs(config: QatConfig, n_train: int, batch_size: int) -> tuple[int, int]:
    """(epochs, steps per epoch): ``qat.epochs`` capped so that at most ``qat.max_steps`` steps run."""
    steps = max(1, n_train // batch_size if n_train > batch_size else 1)
    if config.max_steps <= 0:
        return config.epochs, steps
    return max(1, min(config.epochs, math.ceil(config.max_steps / steps))), steps


class QatPass(Pass):
    name = "qat"
    section = "qat"
    stage = "qat"
    quantizes = True

    def _run_for_config(self, student: "nn.Module", config: QatConfig, ctx: PassContext) -> PassOutput:
        bits = resolve_weight_bits(config.weight_bits)
        converted, info = quantization_aware_training(student, ctx=ctx, config=config, bits=bits)
        summary = {"weight_bits": bits, "weight_bits_setting": config.weight_bits.value,
                   "cpu_vnni": cpu_has_vnni(), **info}
        return PassOutput(converted, summary, program=serialize_program(converted, ctx.input_shape))


def quantization_aware_training(student: "nn.Module", *, ctx: PassContext, config: QatConfig,
                                bits: int) -> tuple["nn.Module", dict[str, Any]]:
    """Returns (converted pt2e module, facts for the report: epochs, steps, validation accuracy)."""
    import torchao.quantization.pt2e as pt2e
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    from toolchain import engine

    example = ctx.train[0][: min(8, len(ctx.train[0]))]
    graph, bn = export_for_quantization(student, example, fold_bn=config.fold_batchnorm, train=True)
    try:
        prepared = prepare_qat_pt2e(graph, make_quantizer(bits))
    except Exception as e:  # prepare failures come in many types
        raise CompressionError(f"QAT: cannot prepare the student for quantization: {e}") from e
    pt2e.allow_exported_model_train_eval(prepared)
    epochs, steps = qat_epochs(config, len(ctx.train[0]), ctx.cfg.data.batch_size)
    freeze_at = max(1, min(config.freeze_observer_epoch, epochs - 1))

    def on_epoch_end(state: engine.FitState) -> None:
        if state.epoch >= freeze_at:
            prepared.apply(pt2e.disable_observer)

    d = ctx.cfg.distill
    state = engine.fit(
        prepared, loss_fn=ctx.train_task.distill_loss(ctx.teacher, temperature=d.temperature, alpha=d.alpha),
        metric=ctx.train_task.model_metric, augment=ctx.train_task.augment,
        train=ctx.train, val=ctx.val,
        opts=ctx.fit_options(epochs=epochs, lr=config.lr, desc="qat", seed_offset=200, weight_decay=0.0, amp=False),
        on_epoch_end=on_epoch_end,
    )
    pt2e.move_exported_model_to_eval(prepared)
    converted = convert_pt2e(prepared)
    pt2e.allow_exported_model_train_eval(converted)
    return converted, {"epochs": config.epochs, "epochs_run": state.epoch, "steps": state.epoch * steps,
                       "freeze_observer_epoch": freeze_at, "val_accuracy": state.best_acc, **bn}
