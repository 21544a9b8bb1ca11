"""Classification's training half: cross-entropy, Hinton distillation, shifts/flips/mixing, the top-1 build gate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np

from edgecore.errors import DataError
from edgecore.spec import Precision

from .base import ExportCheck, LossFn, RefreshTargets, TrainTask, budget_problem

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from calibration.confidence import TemperatureFit
    from edgecore.samples import Sample
    from toolchain.engine import FitOptions
    from toolchain.passes.base import PassContext
    from toolchain.verify import VerifyResult

__all__ = ["ClassifyTraining", "kd_loss", "hard_loss", "mix_batch", "MIN_FP32_AGREEMENT", "MAX_LISTED_MISMATCHES"]

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
    return alpha * soft + (1.0 - alpha) * hard_loss(student_logits, y, label_smoothing=label_smoothing)


def hard_loss(logits: "torch.Tensor", y: "torch.Tensor", *, label_smoothing: float = 0.0) -> "torch.Tensor":
    """Cross-entropy on the labels: class indices, or a mixed batch's ``[label_a, label_b, weight_a]`` rows
    (`mix_batch`), each input's loss then ``weight_a * CE(label_a) + (1 - weight_a) * CE(label_b)``."""
    import torch.nn.functional as F

    if y.ndim == 1:
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    lam = y[:, 2]
    a = F.cross_entropy(logits, y[:, 0].long(), label_smoothing=label_smoothing, reduction="none")
    b = F.cross_entropy(logits, y[:, 1].long(), label_smoothing=label_smoothing, reduction="none")
    return (lam * a + (1.0 - lam) * b).mean()


def mix_batch(xb: "torch.Tensor", yb: "torch.Tensor", kind: str, alpha: float) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Each input mixed with another of the batch (a random pairing), weight ``lam ~ Beta(alpha, alpha)``:
    ``mixup`` blends the two inputs, ``cutmix`` pastes a block of the other (a segment of a 1-D signal) covering
    ``1 - lam`` of it (``lam`` then the share actually kept). Returns the mixed inputs and ``[label_a, label_b,
    lam]`` rows (`hard_loss`); a teacher asked about the mixed inputs answers for exactly what the student sees."""
    import torch

    n = xb.shape[0]
    perm = torch.randperm(n, device=xb.device)
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    if kind == "cutmix":
        dims = [d for d in range(2, xb.ndim) if xb.shape[d] > 1] or [xb.ndim - 1]
        side = (1.0 - lam) ** (1.0 / len(dims))
        where: list[Any] = [slice(None)] * xb.ndim
        cut_share = 1.0
        for d in dims:
            size = xb.shape[d]
            cut = int(round(size * side))
            start = int(torch.randint(0, size - cut + 1, ()))
            where[d] = slice(start, start + cut)
            cut_share *= cut / size
        xb = xb.clone()
        xb[tuple(where)] = xb[perm][tuple(where)]
        lam = 1.0 - cut_share
    elif kind == "mixup":
        xb = lam * xb + (1.0 - lam) * xb[perm]
    else:
        raise ValueError(f"unknown mix {kind!r} (known: none, mixup, cutmix)")
    rows = torch.stack([yb.float(), yb[perm].float(), torch.full((n,), lam, device=xb.device)], 1)
    return xb, rows


class ClassifyTraining(TrainTask):
    name: ClassVar[str] = "classify"
    sources: ClassVar[tuple[str, ...]] = ("digits", "mnist1d", "imagefolder:PATH", "python:module:function")

    @classmethod
    def stratify(cls, y: np.ndarray, labels: tuple[str, ...]) -> np.ndarray | None:
        """The class indices: every split keeps the classes' proportions (each class needs 3 samples)."""
        y = np.asarray(y)
        counts = np.bincount(y, minlength=len(labels))
        present = counts[counts > 0]
        if len(present) < 2:
            raise DataError(f"data has {len(present)} class(es) with samples; need at least 2")
        if present.min() < 3:
            raise DataError(
                f"class {labels[int(np.argmin(np.where(counts > 0, counts, 1 << 30)))]!r} has fewer than 3 samples; "
                "cannot make a stratified train/val/test split"
            )
        return y

    def representative_labels(self, y: Any) -> np.ndarray | None:
        return np.asarray(y)

    def augment(self, xb: "torch.Tensor", yb: Any, opts: "FitOptions") -> tuple["torch.Tensor", Any]:
        """With ``opts.augment``: random shifts by up to ``opts.shift`` pixels (a signal's samples), and with
        ``opts.flip`` half the batch mirrored (left-right; a signal reversed). Rotations and noise on a share of
        the batch (the teacher's broader data, or a distillation view: ``opts.rotate_deg``, ``opts.noise_std``).
        Then ``opts.mix`` (mixup, cutmix) pairs inputs: the labels become `mix_batch`'s rows; else unchanged."""
        from toolchain.engine import broad_augment, shift_augment

        if opts.augment:
            xb = shift_augment(xb, opts.shift)
            if opts.flip and xb.ndim == 4:
                import torch

                pick = torch.rand(xb.shape[0], device=xb.device) < 0.5
                xb = torch.where(pick[:, None, None, None], xb.flip(-1), xb)
        if opts.rotate_deg > 0 or opts.noise_std > 0:
            xb = broad_augment(xb, rotate_deg=opts.rotate_deg, noise_std=opts.noise_std, fraction=opts.broad_fraction)
        if opts.mix != "none":
            xb, yb = mix_batch(xb, yb, opts.mix, opts.mix_alpha)
        return xb, yb

    def view(self, opts: "FitOptions") -> dict[str, Any]:
        shift = opts.shift if opts.augment else 0
        flip = bool(opts.flip and opts.augment)
        view = {"shift": shift, "flip": flip, "noise_std": opts.noise_std, "rotate_deg": opts.rotate_deg,
                "mix": opts.mix, "mix_alpha": opts.mix_alpha if opts.mix != "none" else None}
        view["deterministic"] = not (shift or flip or opts.noise_std or opts.rotate_deg or opts.mix != "none")
        return view

    def cached_distill_loss(self, teacher: "nn.Module", x: "torch.Tensor", y: Any, *, temperature: float,
                            alpha: float, label_smoothing: float = 0.0) -> tuple[Any, LossFn]:
        """The teacher's logits on ``x`` computed once, packed beside the labels: ``[logits..., label]`` rows."""
        import torch

        from toolchain import engine

        targets = torch.cat([engine.predict(teacher, x), y[:, None].float()], 1)

        def fn(model: "nn.Module", xb: "torch.Tensor", yb: "torch.Tensor") -> "torch.Tensor":
            return kd_loss(model(xb), yb[:, :-1], yb[:, -1].long(), temperature=temperature, alpha=alpha,
                           label_smoothing=label_smoothing)

        return targets, fn

    def refresh_targets(self, train: "list[Sample]", hold: "list[Sample]", *, num_classes: int, balance: Any,
                        min_box_score: float, rng: np.random.Generator) -> RefreshTargets:
        """Class labels (a person's, else the teacher's top class); soft targets: a person's label one-hot, else
        the teacher's probabilities as the gateway recorded them; the classes evened out (``refresh.balance``:
        oversampled, or by loss weights that average 1)."""
        from toolchain.config import Balance
        from toolchain.refresh.errors import RefreshError

        for s in (*train, *hold):
            if not 0 <= s.label < num_classes:
                raise RefreshError(f"sample {s.id}: label {s.label} outside the run's {num_classes} classes")
        mode = Balance(balance)
        idx = np.arange(len(train))
        y_tr = np.array([s.label for s in train], np.int64)
        w_tr = np.ones(len(train), np.float32)
        counts = np.bincount(y_tr, minlength=num_classes)
        if mode is Balance.OVERSAMPLE and len(train):
            target = counts[counts > 0].max()
            extra = [rng.choice(np.flatnonzero(y_tr == c), target - n) for c, n in enumerate(counts) if 0 < n < target]
            idx = np.concatenate([idx, *extra]) if extra else idx
            w_tr = np.ones(len(idx), np.float32)
        elif mode is Balance.WEIGHT and len(train):
            # every present class weighs the same in total and the weights average 1: the classes are even, and the
            # collected part's share of the training loss stays what was collected (oversampling grows it)
            w_tr = (len(train) / (np.count_nonzero(counts) * counts[y_tr])).astype(np.float32)
        p_tr = (np.stack([_soft_target(train[i], num_classes) for i in idx]) if len(idx)
                else np.zeros((0, num_classes), np.float32))
        return RefreshTargets(order=idx, y_train=y_tr[idx] if len(idx) else np.zeros(0, np.int64), p_train=p_tr,
                              w_train=w_tr, y_val=np.array([s.label for s in hold], np.int64))

    def refresh_loss(self, ctx: "PassContext", p_collected: np.ndarray, w_collected: np.ndarray, *,
                     alpha: float, temperature: float) -> tuple[Any, LossFn]:
        """On the original training data the teacher's probabilities (distillation) and the labels; on the
        collected samples the teacher's probabilities *as the gateway recorded them* (or a person's label, one-hot)
        and their labels. Loss: ``alpha`` soft cross-entropy + ``1 - alpha`` hard, per sample, averaged with the
        weights (original inputs weigh 1)."""
        import torch
        import torch.nn.functional as F

        from toolchain import engine

        n_orig = len(ctx.train[1]) - len(p_collected)
        with torch.no_grad():
            t_probs = torch.softmax(engine.predict(ctx.teacher, ctx.train[0][:n_orig]).float(), 1)
        soft = torch.cat([t_probs, torch.from_numpy(p_collected)])
        weight = torch.cat([torch.ones(n_orig), torch.from_numpy(w_collected)])
        targets = torch.cat([soft, ctx.train[1][:, None].float(), weight[:, None]], 1)  # [probs..., label, weight]

        def loss_fn(model: Any, xb: "torch.Tensor", yb: "torch.Tensor") -> "torch.Tensor":
            logits = model(xb)
            w = yb[:, -1]
            soft_ce = -(yb[:, :-2] * F.log_softmax(logits, 1)).sum(1)
            hard = F.cross_entropy(logits, yb[:, -2].long(), reduction="none")
            return ((alpha * soft_ce + (1 - alpha) * hard) * w).sum() / w.sum()

        return targets, loss_fn

    def metric(self, raw: np.ndarray, targets: Any) -> float:
        """Top-1 accuracy."""
        return float(self.contract.quality(raw, targets).mean()) if len(raw) else 0.0

    def answers_metric(self, predictions: Sequence[Any], targets: Any) -> float:
        """The share of predicted class indices equal to the targets."""
        y = np.asarray(targets).reshape(-1)
        if len(predictions) != len(y):
            raise DataError(f"answers_metric: {len(predictions)} answers for {len(y)} targets")
        return float(np.mean(np.asarray(predictions, np.int64).reshape(-1) == y)) if len(y) else 0.0

    def export_check(self, name: str, out: np.ndarray, ref_out: np.ndarray, targets: Any, *, atol: float | None,
                     min_agreement: float | None) -> ExportCheck:
        """Max abs logit difference within ``atol``; top-1 agreement at least ``min_agreement``."""
        problems: list[str] = []
        diff = float(np.abs(out - ref_out).max())
        agree = float((out.argmax(1) == ref_out.argmax(1)).mean())
        if atol is not None and diff > atol:
            problems.append(f"{name}: max |logit difference| ORT vs PyTorch {diff:.3g} > export.atol {atol:g}")
        if min_agreement is not None and agree < min_agreement:
            problems.append(f"{name}: top-1 agreement ORT vs PyTorch {agree:.2%} < export.min_agreement "
                            f"{min_agreement:.2%}")
        y = np.asarray(targets)
        return {"ort_accuracy": float((out.argmax(1) == y).mean()),
                "torch_accuracy": float((ref_out.argmax(1) == y).mean()),
                "agreement": agree, "max_abs_logit_diff": diff}, problems

    def loss(self, *, label_smoothing: float = 0.0) -> LossFn:
        def fn(model: "nn.Module", xb: "torch.Tensor", yb: Any) -> "torch.Tensor":
            return hard_loss(model(xb), yb, label_smoothing=label_smoothing)

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
        over = budget_problem("accuracy", acc, ref_acc, budget_pt, unit="%")
        if over:
            problems.append(over)
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


def _soft_target(s: "Sample", num_classes: int) -> np.ndarray:
    if s.human_label is not None or s.teacher_probs.shape != (num_classes,):
        return np.eye(num_classes, dtype=np.float32)[s.label]
    p = np.clip(s.teacher_probs.astype(np.float32), 0, None)
    return p / max(float(p.sum()), 1e-12)
