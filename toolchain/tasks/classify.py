"""Classification's training half: cross-entropy, Hinton distillation, the top-1 build gate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edgecore.spec import Precision

from .base import LossFn, TrainTask

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from calibration.confidence import TemperatureFit
    from toolchain.verify import VerifyResult

__all__ = ["ClassifyTraining", "kd_loss", "MIN_FP32_AGREEMENT", "MAX_LISTED_MISMATCHES"]

MIN_FP32_AGREEMENT = 0.995
MAX_LISTED_MISMATCHES = 20


def kd_loss(student_logits: "torch.Tensor", teacher_logits: "torch.Tensor", y: "torch.Tensor", *,
            temperature: float, alpha: float, label_smoothing: float = 0.0) -> "torch.Tensor":
    """Hinton distillation: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE."""
    import torch.nn.functional as F

    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1), reduction="batchmean"
    ) * (t * t)
    hard = F.cross_entropy(student_logits, y, label_smoothing=label_smoothing)
    return alpha * soft + (1.0 - alpha) * hard


class ClassifyTraining(TrainTask):
    name: ClassVar[str] = "classify"

    def loss(self, *, label_smoothing: float = 0.0) -> LossFn:
        import torch.nn.functional as F

        def fn(model: "nn.Module", xb: "torch.Tensor", yb: Any) -> "torch.Tensor":
            return F.cross_entropy(model(xb), yb, label_smoothing=label_smoothing)

        return fn

    def distill_loss(self, teacher: "nn.Module", *, temperature: float, alpha: float,
                     label_smoothing: float = 0.0) -> LossFn:
        import torch

        teacher.eval()

        def fn(model: "nn.Module", xb: "torch.Tensor", yb: Any) -> "torch.Tensor":
            with torch.no_grad():
                t_logits = teacher(xb)
            return kd_loss(model(xb), t_logits, yb, temperature=temperature, alpha=alpha,
                           label_smoothing=label_smoothing)

        return fn

    def calibrate(self, raw: np.ndarray, targets: Any) -> "TemperatureFit":
        """Temperature scaling of the softmax (NLL on ``raw`` logits, `calibration.confidence.calibrate`)."""
        from calibration.confidence import calibrate

        return calibrate(raw, targets)

    def model_metric(self, model: "nn.Module", x: "torch.Tensor", y: Any) -> float:
        from toolchain import engine

        return float((engine.predict(model, x).argmax(1) == y).float().mean())

    def compare(self, out: np.ndarray, ref_out: np.ndarray, targets: Any, *, precision: Precision, budget_pt: float,
                labels: tuple[str, ...] | list[str] = ()) -> "VerifyResult":
        """Top-1 accuracy within ``budget_pt`` of the reference's; fp32 also agrees with it on ≥ 99.5% of inputs."""
        from toolchain.verify import VerifyResult

        logits = np.asarray(out, dtype=np.float64)
        ref_logits = np.asarray(ref_out, dtype=np.float64)
        y = np.asarray(targets)
        problems: list[str] = []
        if logits.shape != ref_logits.shape:
            return VerifyResult(0.0, float((ref_logits.argmax(1) == y).mean()), 0.0, float("inf"), len(y),
                                problems=[f"output shape {logits.shape} != reference {ref_logits.shape}"],
                                gate_failed=True)
        pred, ref_pred = logits.argmax(1), ref_logits.argmax(1)
        acc, ref_acc = float((pred == y).mean()), float((ref_pred == y).mean())
        agree = float((pred == ref_pred).mean())
        diff = np.abs(logits - ref_logits).max(axis=1)
        bad = np.flatnonzero(pred != ref_pred)
        name = (lambda i: labels[i] if i < len(labels) else str(i)) if labels else str
        mismatches = [
            {"index": int(i), "label": name(int(y[i])), "artifact": name(int(pred[i])),
             "reference": name(int(ref_pred[i])), "max_abs_logit_diff": float(diff[i])}
            for i in bad[np.argsort(-diff[bad])][:MAX_LISTED_MISMATCHES]
        ]
        gate = False
        if not np.all(np.isfinite(logits)):
            problems.append("artifact produced non-finite logits")
            gate = True
        drop_pt = (ref_acc - acc) * 100.0
        if drop_pt > budget_pt + 1e-9:
            problems.append(
                f"accuracy {acc * 100:.2f}% is {drop_pt:.2f} pt below the PyTorch reference {ref_acc * 100:.2f}% "
                f"(budget {budget_pt:.2f} pt, over by {drop_pt - budget_pt:.2f} pt)"
            )
            gate = True
        if precision is Precision.FP32 and agree < MIN_FP32_AGREEMENT:
            problems.append(
                f"fp32 artifact agrees with PyTorch on {agree * 100:.2f}% of {len(y)} test inputs "
                f"(< {MIN_FP32_AGREEMENT * 100:.1f}%); {len(bad)} mismatches, max abs logit diff "
                f"{float(diff.max()):.3g}; first: "
                + ", ".join(f"#{m['index']} {m['artifact']}!={m['reference']}" for m in mismatches[:5])
            )
        return VerifyResult(
            accuracy=acc, reference_accuracy=ref_acc, agreement=agree,
            max_abs_logit_diff=float(diff.max()) if len(diff) else 0.0, n=int(len(y)), mismatches=mismatches,
            mismatch_count=int(len(bad)), problems=problems, gate_failed=gate,
        )
