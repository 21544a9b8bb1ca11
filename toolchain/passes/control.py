"""The scratch control: does compression beat training the student's architecture directly?

The final fp32 student's architecture is re-initialised (every layer's
``reset_parameters``) and trained from scratch with plain cross-entropy and
the teacher's recipe (``[train]``: lr, warm-up, weight decay, label smoothing,
patience) for the same epoch budget the training passes used (prune
fine-tuning plus distillation), on the same split. The report says in one line
how many points compression bought over it, or plainly that it bought none.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from toolchain.passes.base import PassContext, stage_row, state_size

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def epoch_budget(sections: dict[str, dict[str, Any]], cfg: Any) -> int:
    """Training epochs the fp32 passes were given (the configured budget, before early stopping)."""
    budget = 0
    if sections.get("prune", {}).get("pruned"):
        # the fine-tuning the chosen student got (the latency search's: its step count)
        budget += int(sections["prune"].get("steps", cfg.prune.steps)) * cfg.prune.finetune_epochs
    if "distill" in sections:
        budget += cfg.distill.epochs
    return budget


def reinitialise(model: "nn.Module", seed: int) -> "nn.Module":
    """A copy of ``model`` with every parameterised layer freshly initialised."""
    import torch

    fresh = copy.deepcopy(model).cpu()
    torch.manual_seed(seed)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    return fresh.train()


def scratch_control(student: "nn.Module", ctx: PassContext, *, budget: int,
                    student_accuracy: float) -> dict[str, Any]:
    """Train the student's architecture from scratch for ``budget`` epochs; the control's report section."""
    import time

    from toolchain import engine

    t = ctx.cfg.train
    model = reinitialise(student, ctx.cfg.run.seed + 300)
    t0 = time.perf_counter()
    state = engine.fit(
        model, loss_fn=ctx.train_task.loss(label_smoothing=t.label_smoothing), metric=ctx.train_task.model_metric,
        augment=ctx.train_task.augment,
        train=ctx.train, val=ctx.val,
        opts=ctx.fit_options(epochs=budget, lr=t.lr, desc="scratch control", seed_offset=300,
                             warmup_epochs=min(t.warmup_epochs, budget - 1), patience=t.patience),
    )
    row = stage_row(f"scratch control ({budget} epochs)", model.cpu().eval(), ctx, size=state_size(model),
                    seconds=time.perf_counter() - t0)
    gain = (student_accuracy - row["test_accuracy"]) * 100
    return {"kind": "scratch", "epochs": budget, "epochs_run": state.epoch, "test_accuracy": row["test_accuracy"],
            "student_accuracy": student_accuracy, "gain_pt": round(gain, 2), "verdict": verdict(gain, row, budget),
            "row": row}


def verdict(gain_pt: float, row: dict[str, Any], budget: int) -> str:
    """One line: what compression bought over the scratch control."""
    acc = f"{row['test_accuracy']:.2%}"
    if gain_pt > 0:
        return (f"compression bought {gain_pt:+.2f} pt over training the same architecture from scratch "
                f"({budget} epochs: {acc})")
    beside = f"{-gain_pt:.2f} pt above" if gain_pt < 0 else "the same as"
    return (f"compression bought nothing: the same architecture trained from scratch for {budget} epochs "
            f"reaches {acc}, {beside} the compressed student")
