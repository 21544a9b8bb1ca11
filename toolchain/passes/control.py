"""The scratch control: does compression beat training the student's architecture directly?

The final fp32 student's architecture is re-initialised (every layer's
``reset_parameters``) and trained from scratch with cross-entropy on the labels
and the teacher's recipe (``[train]``: lr, warm-up, weight decay, label smoothing)
for the same optimisation steps the training passes were given (prune
fine-tuning plus distillation: the same epochs of the same split and batch
size), on the same view distillation trained on (its shifts, flips, noise and
mixing: ``[distill]``), without early stopping (the best validation epoch is
kept, as for every stage). Compute-matched, then: the report states both step
counts, and in one line how many points compression bought over it, or
plainly that it bought none.
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


def compressed_steps(sections: dict[str, dict[str, Any]], cfg: Any, steps_per_epoch: int) -> dict[str, int]:
    """Optimisation steps of the fp32 training passes: configured (``prune``, ``distill``, ``total``) and
    run (``total_run``: distillation may stop early)."""
    prune = (epoch_budget({"prune": sections["prune"]}, cfg) if "prune" in sections else 0) * steps_per_epoch
    distill = sections.get("distill")
    configured = int(distill.get("steps", cfg.distill.epochs * steps_per_epoch)) if distill is not None else 0
    run = int(distill.get("steps_run", configured)) if distill is not None else 0
    return {"prune": prune, "distill": configured, "total": prune + configured, "total_run": prune + run}


def scratch_control(student: "nn.Module", ctx: PassContext, *, budget: int, student_accuracy: float,
                    sections: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train the student's architecture from scratch for ``budget`` epochs; the control's report section.

    ``sections``: the passes' report sections; with a ``distill`` one the control trains on distillation's view."""
    import time

    from toolchain import engine

    sections = sections or {}
    t = ctx.cfg.train
    view = ctx.cfg.distill.view_options() if "distill" in sections else {}
    runs = []
    for i in range(ctx.cfg.compress.control_seeds):  # each: its own initialisation and data order
        model = reinitialise(student, ctx.cfg.run.seed + 300 + i)
        opts = ctx.fit_options(epochs=budget, lr=t.lr, desc="scratch control", seed_offset=300 + i,
                               warmup_epochs=min(t.warmup_epochs, budget - 1), patience=None, **view)
        t0 = time.perf_counter()
        state = engine.fit(
            model, loss_fn=ctx.train_task.loss(label_smoothing=t.label_smoothing),
            metric=ctx.train_task.model_metric, augment=ctx.train_task.augment, train=ctx.train, val=ctx.val,
            opts=opts,
        )
        row = stage_row(f"scratch control ({budget} epochs)", model.cpu().eval(), ctx, size=state_size(model),
                        seconds=time.perf_counter() - t0)
        runs.append((row, state.epoch))
    per_epoch = engine.steps_per_epoch(len(ctx.train[0]), opts)
    ranked = sorted(runs, key=lambda r: r[0]["test_accuracy"])
    row, epochs_run = ranked[(len(ranked) - 1) // 2]  # the median control (the lower one of an even count)
    gains = [round((student_accuracy - r["test_accuracy"]) * 100, 2) for r, _ in runs]
    gain = (student_accuracy - row["test_accuracy"]) * 100
    if len(runs) > 1:
        row["stage"] = f"scratch control ({budget} epochs, median of {len(runs)} seeds)"
    return {"kind": "scratch", "epochs": budget, "epochs_run": epochs_run, "steps": budget * per_epoch,
            "steps_run": epochs_run * per_epoch, "compressed_steps": compressed_steps(sections, ctx.cfg, per_epoch),
            "view": ctx.train_task.view(opts), "test_accuracy": row["test_accuracy"],
            "student_accuracy": student_accuracy, "gain_pt": round(gain, 2), "seeds": len(runs),
            "test_accuracies": [r["test_accuracy"] for r, _ in runs], "gains_pt": gains,
            "gain_spread_pt": [min(gains), max(gains)], "verdict": verdict(gain, row, budget), "row": row}


def matching_line(control: dict[str, Any]) -> str:
    """How the control's compute compares with compression's, in one line (printed under the verdict)."""
    c = control["compressed_steps"]
    v = control["view"]
    applied = [f"shifts ≤ {v['shift']}" if v["shift"] else "", "flips" if v["flip"] else "",
               f"noise {v['noise_std']:g}" if v["noise_std"] else "", v["mix"] if v["mix"] != "none" else ""]
    return (f"compute-matched: the control ran {control['steps_run']} optimisation steps, compression "
            f"{c['total_run']} of {c['total']} (prune {c['prune']} + distill {c['distill']}); same view: "
            f"{', '.join(a for a in applied if a) or 'none'}"
            + (f"; over {control['seeds']} control seeds the gain ranges {control['gain_spread_pt'][0]:+.2f}.."
               f"{control['gain_spread_pt'][1]:+.2f} pt" if control.get("seeds", 1) > 1 else ""))


def verdict(gain_pt: float, row: dict[str, Any], budget: int) -> str:
    """One line: what compression bought over the scratch control."""
    acc = f"{row['test_accuracy']:.2%}"
    if gain_pt > 0:
        return (f"compression bought {gain_pt:+.2f} pt over training the same architecture from scratch "
                f"({budget} epochs: {acc})")
    beside = f"{-gain_pt:.2f} pt above" if gain_pt < 0 else "the same as"
    return (f"compression bought nothing: the same architecture trained from scratch for {budget} epochs "
            f"reaches {acc}, {beside} the compressed student")
