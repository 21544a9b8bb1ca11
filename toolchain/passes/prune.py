"""``prune``: structured channel pruning (torch-pruning) to a MACs or params target.

The uniform per-layer channel ratio that makes the student ``prune.ratio``
times smaller than the *teacher* (in ``prune.target``) is found by bisection on
a copy, then applied in ``prune.steps`` iterative steps, each followed by
fine-tuning. A student already within the target (a small student of another
family) is left as it is. Unreachable targets are a `CompressionError`.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from edgecore.errors import CompressionError
from toolchain.config import PruneConfig, PruneTarget
from toolchain.passes.base import Pass, PassContext, PassOutput

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def _output_layers(model: "nn.Module", num_classes: int) -> list["nn.Module"]:
    """Layers whose outputs are the logits: never pruned. A model may name them itself with an
    ``output_layers()`` method (a detector's box and class predictions)."""
    from torch import nn

    out = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    out += [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]
    declared = getattr(model, "output_layers", None)
    if callable(declared):
        out += [m for m in declared() if all(m is not o for o in out)]
    return out


def measure(model: "nn.Module", input_shape: tuple[int, ...], target: PruneTarget) -> int:
    from toolchain.models import count_macs, count_params

    return count_macs(model, input_shape) if target is PruneTarget.MACS else count_params(model)


def make_pruner(model: "nn.Module", *, input_shape: tuple[int, ...], ratio: float, steps: int, num_classes: int,
                importance: str, max_ratio: float, round_to: int = 1) -> Any:
    import torch
    import torch_pruning as tp

    imp = tp.importance.MagnitudeImportance(p=1 if importance == "l1" else 2)
    return tp.pruner.MetaPruner(
        model,
        torch.zeros(1, *input_shape),
        importance=imp,
        pruning_ratio=ratio,
        max_pruning_ratio=max_ratio,
        iterative_steps=steps,
        ignored_layers=_output_layers(model, num_classes),
        global_pruning=False,
        round_to=round_to if round_to > 1 else None,
    )


def find_pruning_ratio(model: "nn.Module", *, input_shape: tuple[int, ...], num_classes: int, target: PruneTarget,
                       goal: float, importance: str, max_ratio: float, round_to: int = 1) -> tuple[float, int]:
    """Smallest uniform channel ratio whose pruned copy is ``goal`` times smaller.

    Returns (ratio, measured size). Raises CompressionError when even
    ``max_ratio`` does not reach the goal.
    """
    base = measure(model, input_shape, target)
    want = base / goal

    def pruned_size(r: float) -> int:
        m = copy.deepcopy(model).eval()
        make_pruner(m, input_shape=input_shape, ratio=r, steps=1, num_classes=num_classes,
                    importance=importance, max_ratio=max_ratio, round_to=round_to).step()
        return measure(m, input_shape, target)

    # Channel rounding makes size non-monotone near max_ratio on tiny layers (a
    # layer that would drop to 0 channels is skipped): scan a grid, then bisect.
    grid = [round(max_ratio * k / 10, 4) for k in range(1, 11)]
    sizes = [pruned_size(r) for r in grid]
    ok = [i for i, s in enumerate(sizes) if s <= want]
    if not ok:
        smallest = min(sizes)
        raise CompressionError(
            f"pruning target unreachable: {goal:g}x fewer {target.value} needs <= {want:,.0f}, but the most "
            f"pruning up to {max_ratio:.0%} of each layer's channels reaches is {smallest:,} "
            f"({base / max(smallest, 1):.1f}x); lower prune.ratio or use a larger teacher"
        )
    i = ok[0]
    lo, hi, best = (grid[i - 1] if i > 0 else 0.0), grid[i], (grid[i], sizes[i])
    for _ in range(6):
        mid = (lo + hi) / 2
        size = pruned_size(mid)
        if size <= want:
            hi, best = mid, (mid, size)
        else:
            lo = mid
    return best


class PrunePass(Pass):
    name = "prune"
    section = "prune"
    stage = "pruned"

    def _run_for_config(self, student: "nn.Module", config: PruneConfig, ctx: PassContext) -> PassOutput:
        p = config
        if p.target is PruneTarget.LATENCY:
            return self._latency(student, p, ctx)
        teacher_size = ctx.teacher_macs if p.target is PruneTarget.MACS else ctx.teacher_params
        goal = measure(student, ctx.input_shape, p.target) / (teacher_size / p.ratio)
        model = copy.deepcopy(student)
        ratio = 0.0
        if goal > 1.0 + 1e-9:
            ratio, _ = find_pruning_ratio(
                student, input_shape=ctx.input_shape, num_classes=ctx.num_classes, target=p.target, goal=goal,
                importance=p.importance, max_ratio=p.max_channel_ratio, round_to=p.round_to,
            )
            self._prune_and_finetune(model, ratio, ctx)
        model = model.cpu().eval()
        achieved = teacher_size / max(1, measure(model, ctx.input_shape, p.target))
        if achieved + 1e-9 < p.ratio:
            raise CompressionError(f"pruning reached only {achieved:.2f}x fewer {p.target.value}, target {p.ratio:g}x")
        from toolchain.models import count_macs, count_params

        return PassOutput(model, {
            "target": p.target.value, "ratio_goal": p.ratio, "channel_ratio": round(ratio, 4),
            "macs_reduction": ctx.teacher_macs / max(count_macs(model, ctx.input_shape), 1),
            "params_reduction": ctx.teacher_params / max(count_params(model), 1), "steps": p.steps,
            "pruned": ratio > 0, "round_to": p.round_to,
        })

    def _latency(self, student: "nn.Module", p: PruneConfig, ctx: PassContext) -> PassOutput:
        from toolchain.models import count_macs, count_params
        from toolchain.passes.latency_search import search

        model, section = search(student, p, ctx)
        chosen = next(c for c in section["candidates"] if c["chosen"])
        return PassOutput(model, {
            "target": p.target.value, "channel_ratio": chosen["channel_ratio"],
            "macs_reduction": ctx.teacher_macs / max(count_macs(model, ctx.input_shape), 1),
            "params_reduction": ctx.teacher_params / max(count_params(model), 1), "steps": chosen["step"],
            "pruned": chosen["step"] > 0, "latency": section,
        })

    def _prune_and_finetune(self, model: "nn.Module", ratio: float, ctx: PassContext) -> None:
        from toolchain import engine

        p = self.config
        model.train()
        pruner = make_pruner(model, input_shape=ctx.input_shape, ratio=ratio, steps=p.steps,
                             num_classes=ctx.num_classes, importance=p.importance, max_ratio=p.max_channel_ratio,
                             round_to=p.round_to)
        for step in range(p.steps):
            model.eval()
            pruner.step()
            if p.finetune_epochs > 0:
                engine.fit(
                    model, loss_fn=engine.ce_loss(self.cfg.train.label_smoothing), train=ctx.train, val=ctx.val,
                    opts=ctx.fit_options(epochs=p.finetune_epochs, lr=p.lr, desc=f"prune {step + 1}/{p.steps}",
                                         seed_offset=step),
                )
