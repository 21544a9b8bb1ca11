"""Detection's training half: the detector family, the FCOS loss and its distillation, flips, mAP, the gate.

Targets travel through every split as one padded float32 array ``(N, K_max, 5)`` = ``[class, x1, y1, x2, y2]``
in input pixels, class -1 for padding (`toolchain.data.pad_objects`), so the data loaders and
`toolchain.engine.fit` carry them unchanged. The decoding parameters (`edgecore.detect.DecodeParams`) are the
run's task parameters, set from the teacher at train time (`task_spec`) and read by every stage from
``data.json``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np

from edgecore.detect import DecodeParams, Detections
from edgecore.spec import Precision
from edgecore.tasks import TaskSpec
from edgecore.tasks.detect import Detect, kept_detections, match, targets_as_detections

from .base import ExportCheck, LossFn, RefreshTargets, TrainTask, budget_problem

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from calibration.confidence import TemperatureFit
    from edgecore.samples import Sample
    from toolchain.config import ModelConfig
    from toolchain.engine import FitOptions
    from toolchain.passes.base import PassContext
    from toolchain.verify import VerifyResult

__all__ = ["DetectTraining", "MIN_FP32_BOX_AGREEMENT", "AGREEMENT_IOU"]

AGREEMENT_IOU = 0.9  # a reference box is reproduced by a box of its class overlapping it this much
MIN_FP32_BOX_AGREEMENT = 0.97  # an fp32 artifact reproduces at least this share of the reference's boxes
MAX_LISTED_MISMATCHES = 20


class DetectTraining(TrainTask):
    name: ClassVar[str] = "detect"
    sources: ClassVar[tuple[str, ...]] = ("shapes", "yolo:PATH", "coco:PATH/annotations.json")
    contract: Detect

    # ------------------------------------------------------------------ before the run's parameters exist

    @classmethod
    def build_model(cls, cfg: "ModelConfig", *, input_shape: tuple[int, ...], num_classes: int,
                    what: str = "teacher.family") -> "nn.Module":
        """`toolchain.detection.model.build_detector` (``resnet`` or ``mobilenet`` backbone; ``head_convs``,
        ``neck_width`` from the model section)."""
        from toolchain.detection.model import build_detector

        return build_detector(cfg, input_shape=input_shape, num_classes=num_classes, what=what,
                              neck_width=cfg.neck_width or None, head_convs=cfg.head_convs)

    @classmethod
    def task_spec(cls, model: "nn.Module", input_shape: tuple[int, ...]) -> TaskSpec:
        """``detect`` with the model's `DecodeParams` for the input size (default thresholds)."""
        from toolchain.detection.model import detection_params

        return TaskSpec(cls.name, detection_params(model, (int(input_shape[1]), int(input_shape[2]))).to_dict())

    # ------------------------------------------------------------------ training

    @property
    def params(self) -> DecodeParams:
        return self.contract.params

    def loss(self, *, label_smoothing: float = 0.0) -> LossFn:
        """`toolchain.detection.loss.detection_loss` (quality focal + GIoU); ``label_smoothing`` is a classifier's."""
        from toolchain.detection.loss import detection_loss

        params = self.params

        def fn(model: "nn.Module", xb: "torch.Tensor", yb: Any) -> "torch.Tensor":
            return detection_loss(model(xb), _targets(yb), params)[0]

        return fn

    def distill_loss(self, teacher: "nn.Module", *, temperature: float, alpha: float,
                     label_smoothing: float = 0.0) -> LossFn:
        """`toolchain.detection.loss.distillation_loss`: tempered sigmoid KL and box imitation of the teacher,
        ``alpha`` against the ground-truth loss."""
        import torch

        from toolchain.detection.loss import distillation_loss

        params = self.params
        teacher.eval()

        def fn(model: "nn.Module", xb: "torch.Tensor", yb: Any) -> "torch.Tensor":
            with torch.no_grad():
                t_raw = teacher(xb)
            return distillation_loss(model(xb), t_raw, _targets(yb), params, temperature=temperature, alpha=alpha)[0]

        return fn

    def augment(self, xb: "torch.Tensor", yb: Any, opts: "FitOptions") -> tuple["torch.Tensor", Any]:
        """Random horizontal flips of half the batch, boxes flipped with them (``opts.augment``); gaussian noise
        on ``opts.broad_fraction`` of it (``opts.noise_std``). Rotations (``opts.rotate_deg``) would need
        rotated boxes: not applied."""
        import torch

        if opts.augment:
            flip = torch.rand(xb.shape[0]) < 0.5
            if bool(flip.any()):
                xb, yb = xb.clone(), yb.clone()
                w = float(xb.shape[-1])
                xb[flip] = xb[flip].flip(-1)
                rows = yb[flip]
                valid = rows[..., 0] >= 0
                x1, x2 = rows[..., 1].clone(), rows[..., 3].clone()
                rows[..., 1] = torch.where(valid, w - x2, x1)
                rows[..., 3] = torch.where(valid, w - x1, x2)
                yb[flip] = rows
        if opts.noise_std > 0:
            pick = torch.rand(xb.shape[0]) < opts.broad_fraction
            if bool(pick.any()):
                xb = xb.clone()
                xb[pick] = xb[pick] + torch.randn_like(xb[pick]) * opts.noise_std
        return xb, yb

    def view(self, opts: "FitOptions") -> dict[str, Any]:
        """Flips (``opts.augment``) and noise only: shifts, rotations and mixing are not applied to frames yet."""
        flip = bool(opts.augment)
        return {"shift": 0, "flip": flip, "noise_std": opts.noise_std, "rotate_deg": 0.0, "mix": "none",
                "mix_alpha": None, "deterministic": not (flip or opts.noise_std)}

    def metric(self, raw: np.ndarray, targets: Any) -> float:
        """COCO mAP@0.5:0.95 of the decoded outputs (pycocotools, `toolchain.detection.metrics.evaluate`)."""
        return self.evaluate(raw, targets)["map"]

    @property
    def metric_name(self) -> str:
        return "mAP@0.5:0.95"

    def evaluate(self, raw: np.ndarray, targets: Any) -> dict[str, Any]:
        """Every COCO figure of the decoded outputs (``map``, ``map50``, ``map75``, per class)."""
        from toolchain.detection.metrics import evaluate

        labels = tuple(str(k) for k in range(self.params.num_classes))
        return evaluate(self.contract.detections(raw), targets_as_detections(targets), labels=labels)

    def answers_metric(self, predictions: Sequence[Any], targets: Any) -> float:
        """COCO mAP@0.5:0.95 of the devices' answers (lists of ``{"box", "score", "class"}``, the wire's form)."""
        from toolchain.detection.metrics import evaluate

        dets = [_as_detections(p) for p in predictions]
        labels = tuple(str(k) for k in range(self.params.num_classes))
        return float(evaluate(dets, targets_as_detections(targets), labels=labels)["map"])

    def calibrate(self, raw: np.ndarray, targets: Any) -> "TemperatureFit":
        """A temperature on the class logits: the decoded detections' scores, tempered, fitted (NLL) to whether
        each detection is right (an unclaimed object of its class at IoU >= 0.5); ECE before and after.

        The binary case of `calibration.confidence.calibrate`: logits ``[0, z]`` soften to ``sigmoid(z / T)``.
        """
        from calibration.confidence import calibrate

        z, right = [], []
        for d, t in zip(self.contract.detections(raw), targets_as_detections(targets)):
            s = np.clip(d.scores.astype(np.float64), 1e-6, 1 - 1e-6)
            z.append(np.log(s / (1 - s)))
            right.append(match(d, t))
        logits = np.concatenate(z) if z else np.zeros(0)
        y = np.concatenate(right).astype(np.int64) if right else np.zeros(0, np.int64)
        return calibrate(np.stack([np.zeros_like(logits), logits], axis=1), y)

    # ------------------------------------------------------------------ export and build

    def _agreement(self, out: np.ndarray, ref_out: np.ndarray) -> tuple[float, list[Detections], list[Detections]]:
        from toolchain.detection.metrics import box_agreement

        dets, ref = self.contract.detections(out), self.contract.detections(ref_out)
        return box_agreement(ref, dets, iou=AGREEMENT_IOU), dets, ref

    def export_check(self, name: str, out: np.ndarray, ref_out: np.ndarray, targets: Any, *, atol: float | None,
                     min_agreement: float | None) -> ExportCheck:
        """Max abs difference of the raw outputs within ``atol``; box agreement (the reference's boxes the
        graph reproduces at IoU >= 0.9, same class) at least ``min_agreement``; mAP of both."""
        problems: list[str] = []
        diff = float(np.abs(out - ref_out).max()) if out.shape == ref_out.shape else float("inf")
        agree = self._agreement(out, ref_out)[0] if out.shape == ref_out.shape else 0.0
        if atol is not None and diff > atol:
            problems.append(f"{name}: max |raw output difference| ORT vs PyTorch {diff:.3g} > export.atol {atol:g}")
        if min_agreement is not None and agree < min_agreement:
            problems.append(f"{name}: box agreement ORT vs PyTorch {agree:.2%} (IoU >= {AGREEMENT_IOU}, same class) "
                            f"< export.min_agreement {min_agreement:.2%}")
        return {"ort_accuracy": self.metric(out, targets), "torch_accuracy": self.metric(ref_out, targets),
                "agreement": agree, "max_abs_logit_diff": diff}, problems

    def concat_targets(self, *parts: Any) -> Any:
        """Padded object arrays of different widths as one, padded to the widest (class -1)."""
        from toolchain.data import pad_objects, unpad_objects

        objs = [o for part in parts for o in unpad_objects(np.asarray(part))]
        return pad_objects([b for b, _ in objs], [c for _, c in objs])

    def refresh_targets(self, train: "list[Sample]", hold: "list[Sample]", *, num_classes: int, balance: Any,
                        min_box_score: float, rng: np.random.Generator) -> RefreshTargets:
        """Each frame's objects: the boxes a person kept, else the teacher's scoring at least ``min_box_score``
        (stated in the report). No class balancing: a frame holds several classes (``balance`` is a classifier's)."""
        from toolchain.data import pad_objects

        def padded(samples: "list[Sample]") -> np.ndarray:
            objs = [_answer_objects(s, num_classes, min_box_score) for s in samples]
            return pad_objects([b for b, _ in objs], [c for _, c in objs])

        y_tr = padded(train)
        return RefreshTargets(order=np.arange(len(train)), y_train=y_tr, p_train=np.zeros((len(train), 0), np.float32),
                              w_train=np.ones(len(train), np.float32), y_val=padded(hold),
                              notes={"min_box_score": min_box_score,
                                     "teacher_boxes": int((y_tr[:, :, 0] >= 0).sum())})

    def refresh_loss(self, ctx: "PassContext", p_collected: np.ndarray, w_collected: np.ndarray, *,
                     alpha: float, temperature: float) -> tuple[Any, LossFn]:
        """The ground-truth boxes of the original frames and the collected frames' boxes as targets, distilled
        from the teacher on every frame (`distill_loss`)."""
        return ctx.train[1], self.distill_loss(ctx.teacher, temperature=temperature, alpha=alpha)

    def compare(self, out: np.ndarray, ref_out: np.ndarray, targets: Any, *, precision: Precision, budget_pt: float,
                labels: tuple[str, ...] | list[str] = ()) -> "VerifyResult":
        """mAP@0.5:0.95 within ``budget_pt`` mAP points of the reference's (the gate); box agreement with the
        reference (IoU >= 0.9, same class) reported, and for fp32 at least 97%."""
        from toolchain.detection.metrics import box_agreement
        from toolchain.verify import VerifyResult

        out = np.asarray(out, np.float32)
        ref_out = np.asarray(ref_out, np.float32)
        ref_map = self.metric(ref_out, targets)
        n = len(ref_out)
        if out.shape != ref_out.shape:
            return VerifyResult(0.0, ref_map, 0.0, float("inf"), n, gate_failed=True,
                                problems=[f"output shape {out.shape} != reference {ref_out.shape}"])
        problems: list[str] = []
        gate = False
        if not np.all(np.isfinite(out)):
            return VerifyResult(0.0, ref_map, 0.0, float("inf"), n, gate_failed=True,
                                problems=["artifact produced non-finite outputs"])
        agree, dets, ref = self._agreement(out, ref_out)
        got = self.metric(out, targets)
        per_image = np.array([box_agreement([r], [d], iou=AGREEMENT_IOU) for r, d in zip(ref, dets)])
        diff = np.abs(out - ref_out).reshape(n, -1).max(axis=1)
        bad = np.flatnonzero(per_image < 1.0)
        name = (lambda c: labels[c] if c < len(labels) else str(c)) if labels else str
        mismatches = [
            {"index": int(i), "agreement": float(per_image[i]), "reference_boxes": len(ref[i]),
             "artifact_boxes": len(dets[i]), "reference_classes": sorted({name(int(c)) for c in ref[i].classes}),
             "max_abs_logit_diff": float(diff[i])}
            for i in bad[np.argsort(per_image[bad], kind="stable")][:MAX_LISTED_MISMATCHES]
        ]
        over = budget_problem("mAP@0.5:0.95", got, ref_map, budget_pt)
        if over:
            problems.append(over)
            gate = True
        if precision is Precision.FP32 and agree < MIN_FP32_BOX_AGREEMENT:
            problems.append(
                f"fp32 artifact reproduces {agree * 100:.2f}% of the PyTorch reference's boxes on {n} test images "
                f"(IoU >= {AGREEMENT_IOU}, same class; < {MIN_FP32_BOX_AGREEMENT * 100:.0f}%); {len(bad)} images "
                f"differ, max abs output diff {float(diff.max()):.3g}"
            )
        return VerifyResult(
            accuracy=got, reference_accuracy=ref_map, agreement=agree,
            max_abs_logit_diff=float(diff.max()) if n else 0.0, n=n, mismatches=mismatches,
            mismatch_count=int(len(bad)), problems=problems, gate_failed=gate,
        )


def _answer_objects(s: "Sample", num_classes: int, min_score: float) -> tuple[np.ndarray, np.ndarray]:
    """A collected frame's objects: a person's kept boxes (all of them), else the teacher's at least
    ``min_score`` sure; ``(boxes (K, 4) float32, classes (K,) int64)``."""
    from toolchain.refresh.errors import RefreshError

    dets = kept_detections(s, min_score)
    if dets is None:
        raise RefreshError(f"sample {s.id} from {s.device}: no detections in its answer (a sample of another task?)")
    try:
        boxes = np.array([[float(v) for v in d["box"]] for d in dets], np.float32).reshape(-1, 4)
        classes = np.array([int(d["class"]) for d in dets], np.int64)
    except (KeyError, TypeError, ValueError) as e:
        raise RefreshError(f"sample {s.id}: a malformed detection in its answer ({e})") from e
    if len(classes) and (classes.min() < 0 or classes.max() >= num_classes):
        raise RefreshError(f"sample {s.id}: class {int(classes.max())} outside the run's {num_classes} classes")
    if not np.all(np.isfinite(boxes)) or np.any(boxes[:, 2:] < boxes[:, :2]):
        raise RefreshError(f"sample {s.id}: a box that is not finite or has x2 < x1 / y2 < y1")
    return boxes, classes


def _as_detections(prediction: Sequence[Any]) -> Detections:
    """One answer's list of detections (`edgecore.tasks.detect.as_json`'s form) as `Detections`, best first."""
    dets = sorted(prediction, key=lambda d: -float(d["score"]))
    return Detections(np.array([d["box"] for d in dets], np.float32).reshape(-1, 4),
                      np.array([d["score"] for d in dets], np.float32), np.array([d["class"] for d in dets], np.int64))


def _targets(yb: Any) -> list[tuple[Any, Any]]:
    """A batch's padded targets ``(B, K, 5)`` -> per image ``(boxes (K_i, 4), classes (K_i,))`` (on the CPU:
    the loss pads and moves them itself)."""
    y = yb.detach().cpu()
    out = []
    for row in y:
        keep = row[:, 0] >= 0
        out.append((row[keep, 1:], row[keep, 0].long()))
    return out
