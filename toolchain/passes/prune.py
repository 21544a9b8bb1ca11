"""``prune``: structured channel pruning (torch-pruning) to a MACs or params target.

Transformers lose whole attention heads and MLP width (`HeadAwarePruner`, docs/toolchain.md "Transformers").

The uniform per-layer channel ratio that makes the student ``prune.ratio``
times smaller than the *teacher* (in ``prune.target``) is found by bisection on
a copy, then applied in ``prune.steps`` iterative steps, each followed by
fine-tuning. A student already within the target (a small student of another
family) is left as it is. Unreachable targets are a `CompressionError`.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgecore.errors import CompressionError
from toolchain.passes.base import Pass, PassContext, PassOutput
from toolchain.section import MAX_EPOCHS, MAX_STEPS, Check, Section

MAX_LATENCY_ROUNDS = 100  # each round times the reference and the candidate once

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


class PruneTarget(str, enum.Enum):
    """What the pruning ratio is measured on."""

    MACS = "macs"
    PARAMS = "params"
    LATENCY = "latency"  # measured on the target runtime (prune.latency_*)


@dataclass(frozen=True)
class PruneConfig(Section):
    target: PruneTarget = PruneTarget.MACS
    ratio: float = 10.0  # reach at least this many times fewer MACs (or params) than the teacher
    steps: int = 4  # iterative steps, each followed by fine-tuning
    finetune_epochs: int = 2  # per step
    importance: str = "l2"  # "l1" | "l2" (magnitude of the channel group)
    max_channel_ratio: float = 0.95  # never remove more than this fraction of one layer's channels
    round_to: int = 1  # keep each pruned layer's channel count a multiple of this (torch-pruning's round_to)
    lr: float = 2e-3
    # target = "latency": NetAdapt-style search, each candidate built for latency_target and timed
    latency_budget_ms: float = 0.0  # the percentile below must be within this (required for "latency")
    latency_target: str = "onnx-fp32"  # TARGET-PRECISION the candidates are built for and timed on
    latency_device: str = "local"  # where they are timed ("local": this machine)
    latency_percentile: float = 50.0
    latency_threads: int = 2
    latency_step: float = 0.1  # share of each layer's channels removed per search step
    latency_max_candidates: int = 10  # search steps at most
    latency_extra_steps: int = 1  # steps past the first candidate within budget (a smaller one may be more accurate)
    latency_margin: float = 0.1  # a candidate must measure within budget * (1 - margin): headroom for the noise
    latency_rounds: int = 3  # interleaved rounds timing each candidate against the unpruned reference
    #                              between the search's measurement and the deployed artifact's
    # latency_device = a fleet device id: candidates go to it as signed bundles, timed by its agent's bench command
    latency_broker: str = ""  # mqtt(s)://host:port of the fleet
    latency_credentials: str = ""  # JSON {username, password} (or the fleet credentials.json: its operator entry)
    latency_gateway: str = ""  # upload candidates here (token in $EDGE_GATEWAY_TOKEN); else latency_share_dir
    latency_share_dir: str = ""  # without a gateway: a folder the device reads too (a shared mount)
    latency_sign_key: str = ""  # Ed25519 private key signing the candidate bundles (devices refuse unsigned ones)
    latency_command_key: str = ""  # the command key the device trusts (the gateway's): the bench job is signed
    latency_deadline_s: float = 120.0  # per candidate, for the device's answer

    def validate(self, check: Check) -> None:
        check.need(self.ratio >= 1.0, "ratio", "must be >= 1")
        check.count("steps", low=1, high=MAX_STEPS)
        check.count("finetune_epochs", low=0, high=MAX_EPOCHS)
        check.need(self.importance in ("l1", "l2"), "importance", "must be 'l1' or 'l2'")
        check.need(0.0 < self.max_channel_ratio < 1.0, "max_channel_ratio", "must be in (0, 1)")
        check.need(1 <= self.round_to <= 256, "round_to", "must be an integer in [1, 256]")
        if self.target is PruneTarget.LATENCY:
            check.need(self.latency_budget_ms > 0, "latency_budget_ms", "must be > 0 when prune.target = 'latency'")
            if self.latency_device != "local":
                check.need(bool(self.latency_broker), "latency_broker",
                           f"is required to measure on fleet device {self.latency_device!r} "
                           "(or use latency_device = 'local')")
                check.need(bool(self.latency_gateway or self.latency_share_dir), "latency_gateway",
                           "or latency_share_dir is required: how the fleet device gets each candidate bundle")
        check.need(0.0 < self.latency_percentile <= 100.0, "latency_percentile", "must be in (0, 100]")
        check.need(self.latency_threads >= 1, "latency_threads", "must be >= 1")
        check.need(0.0 < self.latency_step < 1.0, "latency_step", "must be in (0, 1)")
        check.count("latency_max_candidates", low=1, high=MAX_STEPS)
        check.count("latency_extra_steps", low=0, high=MAX_STEPS)
        check.need(0.0 <= self.latency_margin < 1.0, "latency_margin", "must be in [0, 1)")
        check.count("latency_rounds", low=1, high=MAX_LATENCY_ROUNDS)


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


class HeadAwarePruner:
    """torch-pruning's `MetaPruner`, told where the attention heads are, and checked after every step.

    Each attention layer's q/k/v projections (`toolchain.attention.head_layers`) lose whole heads, the same
    share of heads as every other layer loses of its channels (at least one head is kept), never single
    channels of a head; the MLP widths and the embedding width are pruned like any channel. After each step the
    modules' head counts are updated and the model is run once: a layer that pruning broke is one
    `CompressionError` naming it, with the way out.
    """

    def __init__(self, model: "nn.Module", *, input_shape: tuple[int, ...], ratio: float, steps: int,
                 num_classes: int, importance: str, max_ratio: float, round_to: int = 1) -> None:
        import warnings

        import torch
        import torch_pruning as tp

        from toolchain.attention import head_layers

        self.model = model
        self.example = torch.zeros(1, *input_shape)
        self.heads = head_layers(model)
        num_heads = {lin: int(_heads_of(m)) for m, qkv in self.heads.items() for lin in qkv}
        self.head_ratio, self.steps, self.done = min(ratio, max_ratio), steps, 0
        self.initial_heads = {qkv: num_heads[qkv[0]] for qkv in self.heads.values()}
        imp = tp.importance.MagnitudeImportance(p=1 if importance == "l1" else 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "unwrapped parameters" (position embeddings: pruned on their last dim)
            try:
                self.pruner = tp.pruner.MetaPruner(
                    model, self.example, importance=imp, pruning_ratio=ratio, max_pruning_ratio=max_ratio,
                    iterative_steps=steps, ignored_layers=_output_layers(model, num_classes), global_pruning=False,
                    round_to=round_to if round_to > 1 else None,
                    num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=not num_heads,
                    head_pruning_ratio=min(ratio, max_ratio) if num_heads else 0.0,
                )
            except Exception as e:  # torch-pruning raises many types while tracing
                raise CompressionError(f"{type(model).__name__}: torch-pruning cannot trace this model "
                                       f"({type(e).__name__}: {e}); {_WAY_OUT}") from e

    def step(self) -> None:
        import warnings

        import torch

        from toolchain.attention import sync_heads

        self._schedule_heads()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                self.pruner.step()
            except (AssertionError, RuntimeError, ValueError, IndexError) as e:
                raise CompressionError(f"{_culprit(self.model)}: structured pruning failed "
                                       f"({type(e).__name__}: {e}); {_WAY_OUT}") from e
        self.done += 1
        sync_heads(self.heads, self.pruner.num_heads)
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self.model(self.example.to(next(self.model.parameters()).device))
        except Exception as e:  # the pruned model no longer runs: name the layer, say what to do
            raise CompressionError(f"{_culprit(self.model, e)}: the pruned model no longer runs "
                                   f"({type(e).__name__}: {e}); {_WAY_OUT}") from e
        finally:
            self.model.train(was)

    def _schedule_heads(self) -> None:
        """Tell torch-pruning how many heads each layer loses in this step.

        Its own schedule applies each step's cumulative ratio to the heads *left*, rounded up (4 heads over 4
        steps at 0.5: 4, 3, 2, 1, 0), which over-prunes and can remove the last head. Here a layer keeps
        ``H0 - floor(ratio * H0 * step / steps)`` heads after each step, at least one.
        """
        for qkv, h0 in self.initial_heads.items():
            left = int(self.pruner.num_heads.get(qkv[0], h0))
            keep = max(1, h0 - int(self.head_ratio * h0 * (self.done + 1) / self.steps + 1e-9))
            remove = max(0, left - keep)
            # torch-pruning removes ceil(r * heads left): (remove - 0.5) / left rounds up to exactly ``remove``
            r = (remove - 0.5) / left if remove else 0.0
            for lin in qkv:  # torch-pruning asks about whichever projection its group lists first
                self.pruner.head_pruning_ratio_dict[lin] = [r] * (self.steps + 1)


_WAY_OUT = ('leave "prune" out of compress.passes (e.g. ["distill", "qat"] with a smaller student.family), or '
            "give the attention module a num_heads attribute and separate q/k/v nn.Linear layers "
            "(docs/toolchain.md, \"Transformers\")")


def attention_report(before: "nn.Module", after: "nn.Module") -> list[dict[str, Any]]:
    """Per attention layer: its heads and head width before and after pruning (empty without attention)."""
    from toolchain.attention import head_count, head_layers

    def table(model: "nn.Module") -> dict[str, tuple[int, int]]:
        names = {id(m): n for n, m in model.named_modules()}
        return {names[id(m)]: (head_count(m) or 1, qkv[0].out_features // (head_count(m) or 1))
                for m, qkv in head_layers(model).items()}

    was, now = table(before), table(after)
    return [{"layer": name, "heads": [h, now.get(name, (0, 0))[0]], "head_dim": [d, now.get(name, (0, 0))[1]]}
            for name, (h, d) in was.items()]


def _heads_of(m: "nn.Module") -> int:
    from toolchain.attention import head_count

    return head_count(m) or 1


def _culprit(model: "nn.Module", error: BaseException | None = None) -> str:
    """The layer to blame: an attention module whose heads were not found, else the one the traceback ends in."""
    from toolchain.attention import unhandled_attention

    names = unhandled_attention(model)
    if names:
        return f"attention layer {names[0]!r} ({type(model.get_submodule(names[0])).__name__}: no head count found)"
    tb = error.__traceback__ if error is not None else None
    where = None
    modules = {id(m): n for n, m in model.named_modules()}
    while tb is not None:
        me = tb.tb_frame.f_locals.get("self")
        if me is not None and id(me) in modules and modules[id(me)]:
            where = modules[id(me)]
        tb = tb.tb_next
    return f"layer {where!r} of {type(model).__name__}" if where else type(model).__name__


def make_pruner(model: "nn.Module", *, input_shape: tuple[int, ...], ratio: float, steps: int, num_classes: int,
                importance: str, max_ratio: float, round_to: int = 1) -> HeadAwarePruner:
    return HeadAwarePruner(model, input_shape=input_shape, ratio=ratio, steps=steps, num_classes=num_classes,
                           importance=importance, max_ratio=max_ratio, round_to=round_to)


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

    def stage_for(self, summary: dict[str, Any]) -> str:
        """"pruned", or what happened instead: a student already within the ratio (another, smaller family)
        is passed on untouched, and its row says so rather than "pruned"."""
        return self.stage if summary.get("pruned", True) else "not pruned (already within prune.ratio)"

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
            "pruned": ratio > 0, "round_to": p.round_to, "attention": attention_report(student, model),
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
            "pruned": chosen["step"] > 0, "latency": section, "attention": attention_report(student, model),
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
                    model, loss_fn=ctx.train_task.loss(label_smoothing=self.cfg.train.label_smoothing),
                    metric=ctx.train_task.model_metric, augment=ctx.train_task.augment, train=ctx.train, val=ctx.val,
                    opts=ctx.fit_options(epochs=p.finetune_epochs, lr=p.lr, desc=f"prune {step + 1}/{p.steps}",
                                         seed_offset=step),
                )
