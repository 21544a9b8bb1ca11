"""``prune.target = "latency"``: prune in steps until the student is fast enough *where it will run*.

NetAdapt's loop (Yang et al., ECCV 2018) with measured latency, not a proxy:
each step removes another ``prune.latency_step`` of every prunable layer's
channels (torch-pruning's iterative schedule, magnitude importance), fine-tunes
``prune.finetune_epochs``, then builds the real artifact for
``prune.latency_target`` and times it (`toolchain.latency.LatencyMeter`).

Single timings are noisy (background load, thermal throttling: one reading can
be 2× off), so each candidate is timed in ``prune.latency_rounds`` interleaved
rounds against the unpruned reference; its latency is the median of its
per-round ratios to the reference × the reference's median over every round.
The search then reads a monotone fit of those figures against the channels
removed (`monotone_fit`: removing channels never makes a candidate slower)
rather than single readings, and at the end re-measures the chosen candidate
against the budget (falling back to the next smaller candidate when the
re-measure misses; none left is a CompressionError with the figures). The
search stops ``latency_extra_steps`` steps after the first candidate within
``latency_budget_ms`` × (1 − ``latency_margin``) on the fit (at ``latency_percentile``; the margin
absorbs the noise between this measurement and the deployed artifact's) and keeps the most accurate
within-budget candidate by *validation* accuracy (the test split only reports).
Unlike NetAdapt it prunes every layer by the same share per step rather than
proposing one layer at a time (K proposals per step would multiply the builds by
the layer count); AMC/NetAdapt-style per-layer allocation is the next step.

Every candidate (MACs, params, measured p50/pXX, accuracy, artifact sha256)
lands in ``RUN/latency/candidates.json`` and a Pareto plot
``RUN/latency/pareto.png`` (accuracy vs measured latency, the budget a line).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecore.errors import CompressionError
from edgecore.fsutil import atomic_write_json

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from toolchain.latency import LatencyMeter, Prepared
    from toolchain.passes.base import PassContext
    from toolchain.passes.prune import PruneConfig


def make_meter(p: PruneConfig, ctx: "PassContext") -> "LatencyMeter":
    from calibration.representative import build_representative_set
    from toolchain.latency import LatencyMeter, parse_latency_target

    target, precision = parse_latency_target(p.latency_target)
    x, y = ctx.train[0].numpy(), ctx.train[1].numpy()
    calib = build_representative_set(inputs=x, labels=y, n=min(256, len(x))) if precision == "int8" else None
    cache = ctx.run_dir / "latency" / "cache.json" if ctx.run_dir is not None else None
    return LatencyMeter(target=target, precision=precision, input_spec=ctx.input_spec, labels=ctx.labels,
                        calibration=calib, samples=ctx.val[0][:16].numpy(), cache_path=cache,
                        device=p.latency_device, percentile=p.latency_percentile, threads=p.latency_threads,
                        fleet={"broker": p.latency_broker, "credentials": p.latency_credentials,
                               "gateway": p.latency_gateway, "share_dir": p.latency_share_dir,
                               "sign_key": p.latency_sign_key, "command_key": p.latency_command_key,
                               "deadline_s": p.latency_deadline_s})


def choose(candidates: list[dict[str, Any]], limit_ms: float, *, budget_ms: float | None = None,
           by: str = "pxx_ms") -> dict[str, Any]:
    """The most accurate (validation) candidate whose latency ``by`` (the search passes its monotone fit,
    ``fit_ms``) is within ``limit_ms``; ties: the faster."""
    ok = [c for c in candidates if c[by] <= limit_ms]
    if not ok:
        best = min(candidates, key=lambda c: c[by])
        margin = f" (with the margin: {limit_ms:.4g} ms)" if budget_ms is not None and budget_ms != limit_ms else ""
        raise CompressionError(
            f"latency budget {budget_ms if budget_ms is not None else limit_ms:g} ms{margin} not met: the fastest of "
            f"{len(candidates)} candidates measured "
            f"{best[by]:.4g} ms (p{best['percentile']:g}) after removing {best['channel_ratio']:.0%} of "
            "the channels; raise prune.latency_budget_ms, prune.max_channel_ratio or latency_max_candidates, "
            "or pick a faster prune.latency_target (e.g. int8)")
    return max(ok, key=lambda c: (c["val_accuracy"], -c[by]))


def monotone_fit(ys: list[float]) -> list[float]:
    """The least-squares non-increasing fit of ``ys`` (pool-adjacent-violators): in step order, removing
    more channels never makes a candidate slower, so a reading above an earlier one is pooled with it."""
    blocks: list[tuple[float, int]] = []  # (sum, count) of each pooled run
    for y in ys:
        total, n = float(y), 1
        while blocks and blocks[-1][0] / blocks[-1][1] < total / n:
            s, k = blocks.pop()
            total, n = total + s, n + k
        blocks.append((total, n))
    return [s / k for s, k in blocks for _ in range(k)]


def _median(xs: list[float]) -> float:
    return float(np.median(np.asarray(xs, dtype=np.float64)))


def _scale(candidates: list[dict[str, Any]], ref_pxx: list[float], ref_p50: list[float]) -> None:
    """Each candidate's latency = its per-round ratios to the reference × the reference's median over every
    round so far; ``fit_ms`` is the monotone fit of those medians in step order."""
    ref_ms, ref50 = _median(ref_pxx), _median(ref_p50)
    for c, fit in zip(candidates, monotone_fit([_median(c["ratios"]) for c in candidates])):
        c.update({"pxx_ms": _median(c["ratios"]) * ref_ms, "p50_ms": _median(c["p50_ratios"]) * ref50,
                  "pxx_range_ms": [min(c["ratios"]) * ref_ms, max(c["ratios"]) * ref_ms], "fit_ms": fit * ref_ms})


def search(student: "nn.Module", p: PruneConfig, ctx: "PassContext") -> tuple["nn.Module", dict[str, Any]]:
    """Run the search on a copy of ``student``; returns the chosen candidate and the report section."""
    from toolchain.passes.prune import make_pruner

    t0 = time.perf_counter()
    meter = make_meter(p, ctx)
    model = copy.deepcopy(student)
    total_steps = max(1, round(p.max_channel_ratio / p.latency_step))
    pruner = make_pruner(model, input_shape=ctx.input_shape, ratio=p.max_channel_ratio, steps=total_steps,
                         num_classes=ctx.num_classes, importance=p.importance, max_ratio=p.max_channel_ratio,
                         round_to=p.round_to)
    candidates: list[dict[str, Any]] = []
    models: dict[int, "nn.Module"] = {0: copy.deepcopy(model).cpu().eval()}
    ref_pxx: list[float] = []
    ref_p50: list[float] = []
    limit = p.latency_budget_ms * (1.0 - p.latency_margin)
    reference = meter.prepare(models[0], name="reference")
    try:
        for step in range(min(total_steps, p.latency_max_candidates) + 1):
            if step > 0:
                model.eval()
                pruner.step()
                _finetune(model, p, ctx, step)
                models[step] = copy.deepcopy(model).cpu().eval()
            cmp = _compare(meter, reference, models[step], step, rounds=p.latency_rounds)
            ref_pxx += cmp["ref_pxx"]
            ref_p50 += cmp["ref_p50"]
            candidates.append(_record(step, models[step], cmp, ctx, ratio=p.max_channel_ratio * step / total_steps))
            _scale(candidates, ref_pxx, ref_p50)
            within = [c["step"] for c in candidates if c["fit_ms"] <= limit]
            if within and step - within[0] >= p.latency_extra_steps:
                break
        chosen = choose(candidates, limit, budget_ms=p.latency_budget_ms, by="fit_ms")
        remeasures = _remeasure(meter, reference, models, candidates, chosen, p, limit)
    finally:
        meter.release(reference)
    chosen = next(c for c in candidates if c["step"] == remeasures[-1]["step"])
    for c in candidates:
        c["chosen"] = c is chosen
    section = {
        "budget_ms": p.latency_budget_ms, "margin": p.latency_margin, "limit_ms": limit, "latency_target": p.latency_target, "device": p.latency_device,
        "percentile": p.latency_percentile, "threads": p.latency_threads, "rounds": p.latency_rounds,
        "reference_ms": _median(ref_pxx), "reference_range_ms": [min(ref_pxx), max(ref_pxx)],
        "candidates": candidates, "chosen_step": chosen["step"], "remeasure": remeasures[-1],
        "remeasures": remeasures, "built_and_measured": meter.measured,
        "cache_hits": len(candidates) - meter.measured, "search_seconds": round(time.perf_counter() - t0, 2),
    }
    if ctx.run_dir is not None:
        section.update(_write(ctx.run_dir / "latency", section))
    return models[chosen["step"]], section


def _compare(meter: "LatencyMeter", reference: "Prepared", model: "nn.Module", step: int, *, rounds: int,
             use_cache: bool = True) -> dict[str, Any]:
    """``model`` timed against the unpruned reference in ``rounds`` interleaved rounds (step 0 is the reference)."""
    prep = reference if step == 0 else meter.prepare(model, name=f"candidate-{step}")
    try:
        return meter.compare(reference, prep, rounds=rounds, use_cache=use_cache)
    finally:
        if prep is not reference:
            meter.release(prep)


def _remeasure(meter: "LatencyMeter", reference: "Prepared", models: dict[int, "nn.Module"],
               candidates: list[dict[str, Any]], chosen: dict[str, Any], p: PruneConfig,
               limit: float) -> list[dict[str, Any]]:
    """Time the chosen candidate against the reference again (never from the cache) and hold it to the budget.

    A miss falls back to the next smaller candidate the fit put within the limit; when none is left, a
    CompressionError names every re-measured figure. Returns every re-measure, the kept one last."""
    order = [chosen] + [c for c in candidates if c["step"] > chosen["step"] and c["fit_ms"] <= limit]
    out: list[dict[str, Any]] = []
    for c in order:
        cmp = _compare(meter, reference, models[c["step"]], c["step"], rounds=p.latency_rounds, use_cache=False)
        ref_ms = _median(cmp["ref_pxx"])
        ratio = _median(cmp["ratios"])
        out.append({"step": c["step"], "pxx_ms": ratio * ref_ms, "percentile": p.latency_percentile,
                    "range_ms": [min(cmp["ratios"]) * ref_ms, max(cmp["ratios"]) * ref_ms],
                    "timings_ms": cmp["pxx"], "reference_ms": ref_ms, "rounds": p.latency_rounds,
                    "search_ms": c["pxx_ms"], "within_budget": ratio * ref_ms <= p.latency_budget_ms})
        if out[-1]["within_budget"]:
            return out
    raise CompressionError(
        f"latency budget {p.latency_budget_ms:g} ms not met when re-measured: " + "; ".join(
            f"step {r['step']} ({candidates[r['step']]['channel_ratio']:.0%} of the channels removed) measured "
            f"{r['pxx_ms']:.4g} ms (p{r['percentile']:g}, range {r['range_ms'][0]:.4g}–{r['range_ms'][1]:.4g} ms "
            f"over {r['rounds']} rounds against the unpruned reference at {r['reference_ms']:.4g} ms; "
            f"the search measured {r['search_ms']:.4g} ms)" for r in out)
        + "; raise prune.latency_margin or prune.latency_rounds, or time on a quieter machine")


def _finetune(model: "nn.Module", p: PruneConfig, ctx: "PassContext", step: int) -> None:
    from toolchain import engine

    if p.finetune_epochs <= 0:
        return
    model.train()
    engine.fit(model, loss_fn=ctx.train_task.loss(label_smoothing=ctx.cfg.train.label_smoothing),
               metric=ctx.train_task.model_metric, augment=ctx.train_task.augment, train=ctx.train, val=ctx.val,
               opts=ctx.fit_options(epochs=p.finetune_epochs, lr=p.lr, desc=f"latency step {step}", seed_offset=step))


def _record(step: int, model: "nn.Module", cmp: dict[str, Any], ctx: "PassContext", *,
            ratio: float) -> dict[str, Any]:
    """One candidate: its size, accuracy and per-round timings (the ms figures are set by `_scale`)."""
    from toolchain.models import count_macs, count_params

    return {"step": step, "channel_ratio": round(ratio, 4), "macs": count_macs(model, ctx.input_shape),
            "params": count_params(model), "percentile": cmp["percentile"],
            "ratio": _median(cmp["ratios"]), "ratios": cmp["ratios"], "p50_ratios": cmp["p50_ratios"],
            "round_ms": cmp["pxx"], "reference_round_ms": cmp["ref_pxx"],
            "val_accuracy": ctx.metric(model, ctx.val), "test_accuracy": ctx.metric(model, ctx.test),
            "sha256": cmp["sha256"], "cached": cmp["cached"]}


def _write(out: Path, section: dict[str, Any]) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "candidates.json", section)
    return {"candidates_file": str(out / "candidates.json"), "plot": str(pareto_plot(section, out / "pareto.png"))}


def pareto_plot(section: dict[str, Any], path: Path) -> Path:
    """Validation accuracy vs measured latency per candidate; the budget as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = section["candidates"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [c["pxx_ms"] for c in cands]
    ys = [100 * c["val_accuracy"] for c in cands]
    spread = [[c["pxx_ms"] - c["pxx_range_ms"][0] for c in cands], [c["pxx_range_ms"][1] - c["pxx_ms"] for c in cands]]
    ax.errorbar(xs, ys, xerr=spread, fmt="o-", color="tab:blue", capsize=3,
                label=f"candidates (step order; range over {section['rounds']} rounds)")
    for c in cands:
        ax.annotate(str(c["step"]), (c["pxx_ms"], 100 * c["val_accuracy"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    best = next(c for c in cands if c.get("chosen"))
    ax.plot([best["pxx_ms"]], [100 * best["val_accuracy"]], "*", ms=16, color="tab:red", label="chosen")
    ax.axvline(section["budget_ms"], color="tab:red", ls="--", label=f"budget {section['budget_ms']:.4g} ms")
    if section.get("limit_ms", section["budget_ms"]) < section["budget_ms"]:
        ax.axvline(section["limit_ms"], color="tab:red", ls=":", label=f"budget less the margin ({section['margin']:.0%})")
    ax.set_xlabel(f"measured p{section['percentile']:g} latency, ms ({section['latency_target']}, {section['device']})")
    ax.set_ylabel("validation accuracy, %")
    ax.set_title("latency-budget search: accuracy vs measured latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
