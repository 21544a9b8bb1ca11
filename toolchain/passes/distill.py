"""``distill``: knowledge distillation (Hinton) from the unpruned teacher.

With ``distill.hidden_weight > 0`` the student also imitates the teacher's last attention layer, MiniLMv2-style:
the token-to-token relations of its q, k and v projections (`toolchain.attention.relation_loss`), which compare
across any two widths, so a pruned or smaller transformer student learns how the teacher attends.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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

    def validate(self, check: Check) -> None:
        check.need(self.temperature > 0, "temperature", "must be > 0")
        check.need(0.0 <= self.hidden_weight <= 100.0, "hidden_weight", "must be in [0, 100]")
        check.need(0.0 <= self.alpha <= 1.0, "alpha", "must be in [0, 1]")
        check.count("epochs", low=0, high=MAX_EPOCHS)


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
        loss_fn = ctx.train_task.distill_loss(teacher, temperature=d.temperature, alpha=d.alpha,
                                              label_smoothing=self.cfg.train.label_smoothing)
        taps = _relation_taps(teacher, model) if d.hidden_weight > 0 else None
        summary = {"temperature": d.temperature, "alpha": d.alpha, "epochs": d.epochs, "hidden_weight": d.hidden_weight}
        try:
            if taps is not None:
                loss_fn = _with_relations(loss_fn, *taps, weight=d.hidden_weight)
                summary["relation_heads"] = taps[2]
            if d.epochs > 0:
                state = engine.fit(
                    model,
                    metric=ctx.train_task.model_metric, augment=ctx.train_task.augment, loss_fn=loss_fn,
                    train=ctx.train, val=ctx.val,
                    opts=ctx.fit_options(epochs=d.epochs, lr=d.lr, desc="distill", seed_offset=100,
                                         warmup_epochs=0, patience=d.patience),
                )
        finally:
            if taps is not None:
                taps[0].close()
                taps[1].close()
        summary["epochs_run"] = state.epoch if state else 0
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
