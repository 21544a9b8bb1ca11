"""``distill``: knowledge distillation (Hinton) from the unpruned teacher."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

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

    def validate(self, check: Check) -> None:
        check.need(self.temperature > 0, "temperature", "must be > 0")
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
        if d.epochs > 0:
            state = engine.fit(
                model,
                metric=ctx.train_task.model_metric, augment=ctx.train_task.augment,
                loss_fn=ctx.train_task.distill_loss(ctx.teacher, temperature=d.temperature, alpha=d.alpha,
                                            label_smoothing=self.cfg.train.label_smoothing),
                train=ctx.train, val=ctx.val,
                opts=ctx.fit_options(epochs=d.epochs, lr=d.lr, desc="distill", seed_offset=100,
                                     warmup_epochs=0, patience=d.patience),
            )
        summary = {"temperature": d.temperature, "alpha": d.alpha, "epochs": d.epochs,
                   "epochs_run": state.epoch if state else 0}
        return PassOutput(model.cpu().eval(), summary)
