"""``ptq``: post-training quantization (torchao pt2e): observe activation ranges, no training.

Same quantizer and program format as ``qat`` (so ``export`` and every int8
target treat the result alike): the student is exported in eval mode
(BatchNorm folded), prepared with the x86 quantizer in PTQ mode, run on
``ptq.calibration_samples`` training samples to observe ranges, and converted.
Seconds instead of epochs; usually a little less accurate than QAT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgecore.errors import CompressionError
from toolchain.passes.base import Pass, PassContext, PassOutput
from toolchain.passes.qat import (
    QdqWeightBits,
    cpu_has_vnni,
    export_for_quantization,
    make_quantizer,
    resolve_weight_bits,
    serialize_program,
)
from toolchain.section import Check, Section

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@dataclass(frozen=True)
class PtqConfig(Section):
    """Post-training quantization (torchao pt2e): calibrate observers, no training."""

    calibration_samples: int = 512  # training samples the activation ranges are observed on
    weight_bits: QdqWeightBits = QdqWeightBits.AUTO
    fold_batchnorm: bool = True

    def validate(self, check: Check) -> None:
        check.need(self.calibration_samples >= 1, "calibration_samples", "must be >= 1")


class PtqPass(Pass):
    name = "ptq"
    section = "ptq"
    stage = "ptq"
    quantizes = True

    def _run_for_config(self, student: "nn.Module", config: PtqConfig, ctx: PassContext) -> PassOutput:
        import torch
        import torchao.quantization.pt2e as pt2e
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        bits = resolve_weight_bits(config.weight_bits)
        X = ctx.train[0]
        calib = X[torch.randperm(len(X), generator=torch.Generator().manual_seed(self.cfg.run.seed))]
        calib = calib[: config.calibration_samples]
        graph, bn = export_for_quantization(student, calib[: min(8, len(calib))], fold_bn=config.fold_batchnorm,
                                            train=False)
        try:
            prepared = prepare_pt2e(graph, make_quantizer(bits, is_qat=False))
        except Exception as e:  # prepare failures come in many types
            raise CompressionError(f"PTQ: cannot prepare the student for quantization: {e}") from e
        with torch.no_grad():
            for i in range(0, len(calib), 256):
                prepared(calib[i : i + 256])
        converted = convert_pt2e(prepared)
        pt2e.allow_exported_model_train_eval(converted)
        summary = {"weight_bits": bits, "weight_bits_setting": config.weight_bits.value, "cpu_vnni": cpu_has_vnni(),
                   "calibration_samples": len(calib), **bn}
        return PassOutput(converted, summary, program=serialize_program(converted, ctx.input_shape))
