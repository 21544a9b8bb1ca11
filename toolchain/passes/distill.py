"""``distill``: knowledge distillation (Hinton) from the unpruned teacher.

The teacher answers on exactly the view the student trains on: the task's augmentation of each batch (shifts up
to ``distill.shift``, ``distill.flip``, ``distill.noise_std``) and ``distill.mix`` (mixup or cutmix between the
batch's inputs) are applied first, then both models see the result ("consistent" distillation, function matching:
Beyer et al., CVPR 2022). ``distill.patience = 0`` runs the whole cosine schedule ("patient"). Where the view is
deterministic (nothing random applied) the teacher's answers are computed once (``distill.cache_teacher``). The
report's ``distill`` section states the recipe: the view as applied, schedule, steps and whether answers were cached.

With ``distill.hidden_weight > 0`` the student also imitates the teacher's last attention layer, MiniLMv2-style:
the token-to-token relations of its q, k and v projections (`toolchain.attention.relation_loss`), which compare
across any two widths, so a pruned or smaller transformer student learns how the teacher attends.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from toolchain.passes.base import Pass, PassContext, PassOutput
from toolchain.section import MAX_EPOCHS, Check, Section

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@dataclass(frozen=True)
class DistillConfig(Section):
    epochs: int = 20
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the soft (teacher) loss; 1 - alpha goes to the hard labels
    lr: float = 3e-3
    patience: int = 8
    # MiniLM-style: weight of the last attention layer's q/k/v relations (teacher's imitated; any two widths); 0: off
    hidden_weight: float = 0.0
    # the view both models see (the task's augmentation; with train.augment = false: no shift, no flip)
    shift: int = 1  # random shifts by up to this many pixels (signals: samples); 0: none
    flip: bool = False  # mirror half of each batch (left-right; a signal reversed)
    noise_std: float = 0.0  # gaussian noise (normalised units) on every input
    mix: str = "none"  # "none" | "mixup" | "cutmix": each input mixed with another of the batch
    mix_alpha: float = 1.0  # mixing weight ~ Beta(mix_alpha, mix_alpha)
    cache_teacher: bool = True  # a deterministic view: the teacher's answers computed once, not every epoch

    MIXES: ClassVar[tuple[str, ...]] = ("none", "mixup", "cutmix")

    def validate(self, check: Check) -> None:
        check.need(0 <= self.shift <= 64, "shift", "must be in [0, 64]")
        check.need(self.noise_std >= 0.0, "noise_std", "must be >= 0")
        check.need(self.mix in self.MIXES, "mix", f"must be one of {', '.join(self.MIXES)}")
        check.need(self.mix_alpha > 0.0, "mix_alpha", "must be > 0")
        check.need(self.patience >= 0, "patience", "must be >= 0 (0: no early stopping, the whole schedule runs)")
        check.need(self.temperature > 0, "temperature", "must be > 0")
        check.need(0.0 <= self.hidden_weight <= 100.0, "hidden_weight", "must be in [0, 100]")
        check.need(0.0 <= self.alpha <= 1.0, "alpha", "must be in [0, 1]")
        check.count("epochs", low=0, high=MAX_EPOCHS)


    def view_options(self) -> dict[str, Any]:
        """The `toolchain.engine.FitOptions` of this view (the scratch control trains on the same one)."""
        return {"shift": self.shift, "flip": self.flip, "noise_std": self.noise_std, "broad_fraction": 1.0,
                "mix": self.mix, "mix_alpha": self.mix_alpha}


class DistillPass(Pass):
    name = "distill"
    section = "distill"
    stage = "distilled"

    def _run_for_config(self, student: "nn.Module", config: DistillConfig, ctx: PassContext) -> PassOutput:
        from toolchain import engine

        d = config
        model = copy.deepcopy(student)
        state = None
        teacher = ctx.teacher
        if d.hidden_weight > 0:  # torch's own attention has no q/k/v layers to tap: its unfused equivalent has
            import torch

            from toolchain.attention import unfuse

            teacher = unfuse(teacher, torch.randn(2, *ctx.input_shape))
        task = ctx.train_task
        opts = ctx.fit_options(epochs=d.epochs, lr=d.lr, desc="distill", seed_offset=100, warmup_epochs=0,
                               patience=d.patience or None, **d.view_options())
        view = task.view(opts)
        kw = dict(temperature=d.temperature, alpha=d.alpha, label_smoothing=self.cfg.train.label_smoothing)
        cached = None
        if d.cache_teacher and view["deterministic"] and d.hidden_weight == 0 and d.epochs > 0:
            cached = task.cached_distill_loss(teacher, *ctx.train, **kw)  # type: ignore[arg-type]
        train = ctx.train
        if cached is not None:
            train, loss_fn = (ctx.train[0], cached[0]), cached[1]
        else:
            loss_fn = task.distill_loss(teacher, **kw)
        taps = _relation_taps(teacher, model) if d.hidden_weight > 0 else None
        per_epoch = engine.steps_per_epoch(len(ctx.train[0]), opts)
        asked = {"shift": d.shift if ctx.augment else 0, "flip": d.flip and ctx.augment, "noise_std": d.noise_std,
                 "mix": d.mix}
        not_applied = [k for k, v in asked.items() if v and view.get(k) != v]
        summary: dict[str, Any] = {
            "temperature": d.temperature, "alpha": d.alpha, "epochs": d.epochs, "hidden_weight": d.hidden_weight,
            "recipe": {"teacher_sees": "the student's view" + (", answers cached" if cached is not None else ""),
                       "view": view, "schedule": f"cosine over {d.epochs} epochs, lr {d.lr:g}, no warm-up",
                       "early_stopping": f"patience {d.patience}" if d.patience else "none (the whole schedule)",
                       "not_applied": not_applied},  # asked for, but this task does not apply it (yet)
            "steps_per_epoch": per_epoch, "steps": d.epochs * per_epoch,
        }
        try:
            if taps is not None:
                loss_fn = _with_relations(loss_fn, *taps, weight=d.hidden_weight)
                summary["relation_heads"] = taps[2]
            if d.epochs > 0:
                state = engine.fit(model, metric=task.model_metric, augment=task.augment, loss_fn=loss_fn,
                                   train=train, val=ctx.val, opts=opts)
        finally:
            if taps is not None:
                taps[0].close()
                taps[1].close()
        summary["epochs_run"] = state.epoch if state else 0
        summary["steps_run"] = summary["epochs_run"] * per_epoch
        return PassOutput(model.cpu().eval(), summary)


def _relation_taps(teacher: "nn.Module", student: "nn.Module") -> tuple[Any, Any, int]:
    """Hooks on both models' last attention layer, and the relation heads: the heads both counts divide."""
    import math

    from toolchain.attention import RelationTap

    t = RelationTap(teacher, "teacher")
    try:
        s = RelationTap(student, "student")
    except Exception:
        t.close()
        raise
    return t, s, math.gcd(t.heads, s.heads)


def _with_relations(base: Any, t: Any, s: Any, heads: int, *, weight: float) -> Any:
    """The task's distillation loss plus ``weight`` x the relation loss of the forward passes it just ran."""
    from toolchain.attention import relation_loss

    def fn(model: "nn.Module", xb: Any, yb: Any) -> Any:
        loss = base(model, xb, yb)  # runs the teacher and the student: the taps now hold this batch's q/k/v
        return loss + weight * relation_loss(t.out, s.out, heads)

    return fn
