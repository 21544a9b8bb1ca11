"""``prune.target = "latency"``: prune in steps until the student is fast enough *where it will run*.

NetAdapt's loop (Yang et al., ECCV 2018) with measured latency, not a proxy:
each step removes another ``prune.latency_step`` of every prunable layer's
channels (torch-pruning's iterative schedule, magnitude importance), fine-tunes
``prune.finetune_epochs``, then builds the real artifact for
``prune.latency_target`` and times it (`toolchain.latency.LatencyMeter`). The
search stops ``latency_extra_steps`` steps after the first candidate within
``latency_budget_ms`` × (1 − ``latency_margin``) (at ``latency_percentile``; the margin
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

from edgecore.errors import CompressionError
from edgecore.fsutil import atomic_write_json

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from toolchain.latency import LatencyMeter
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
                               "sign_key": p.latency_sign_key, "deadline_s": p.latency_deadline_s})


def choose(candidates: list[dict[str, Any]], limit_ms: float, *, budget_ms: float | None = None) -> dict[str, Any]:
    """The most accurate (validation) candidate whose measured pXX is within ``limit_ms``; ties: the faster."""
    ok = [c for c in candidates if c["pxx_ms"] <= limit_ms]
    if not ok:
        best = min(candidates, key=lambda c: c["pxx_ms"])
        margin = f" (with the margin: {limit_ms:.4g} ms)" if budget_ms is not None and budget_ms != limit_ms else ""
        raise CompressionError(
            f"latency budget {budget_ms if budget_ms is not None else limit_ms:g} ms{margin} not met: the fastest of "
            f"{len(candidates)} candidates measured "
            f"{best['pxx_ms']:.4g} ms (p{best['percentile']:g}) after removing {best['channel_ratio']:.0%} of "
            "the channels; raise prune.latency_budget_ms, prune.max_channel_ratio or latency_max_candidates, "
            "or pick a faster prune.latency_target (e.g. int8)")
    return max(ok, key=lambda c: (c["val_accuracy"], -c["pxx_ms"]))


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
    models: dict[int, "nn.Module"] = {}
    within_since: int | None = None
    limit = p.latency_budget_ms * (1.0 - p.latency_margin)
    for step in range(min(total_steps, p.latency_max_candidates) + 1):
        if step > 0:
            model.eval()
            pruner.step()
            _finetune(model, p, ctx, step)
        models[step] = copy.deepcopy(model).cpu().eval()
        candidates.append(_record(step, models[step], meter, ctx, ratio=p.max_channel_ratio * step / total_steps))
        if candidates[-1]["pxx_ms"] <= limit and within_since is None:
            within_since = step
        if within_since is not None and step - within_since >= p.latency_extra_steps:
            break
    chosen = choose(candidates, limit, budget_ms=p.latency_budget_ms)
    for c in candidates:
        c["chosen"] = c is chosen
    section = {
        "budget_ms": p.latency_budget_ms, "margin": p.latency_margin, "limit_ms": limit, "latency_target": p.latency_target, "device": p.latency_device,
        "percentile": p.latency_percentile, "threads": p.latency_threads, "candidates": candidates,
        "chosen_step": chosen["step"], "built_and_measured": meter.measured,
        "cache_hits": len(candidates) - meter.measured, "search_seconds": round(time.perf_counter() - t0, 2),
    }
    if ctx.run_dir is not None:
        section.update(_write(ctx.run_dir / "latency", section))
    return models[chosen["step"]], section


def _finetune(model: "nn.Module", p: PruneConfig, ctx: "PassContext", step: int) -> None:
    from toolchain import engine

    if p.finetune_epochs <= 0:
        return
    model.train()
    engine.fit(model, loss_fn=ctx.train_task.loss(label_smoothing=ctx.cfg.train.label_smoothing),
               metric=ctx.train_task.model_metric, augment=ctx.train_task.augment, train=ctx.train, val=ctx.val,
               opts=ctx.fit_options(epochs=p.finetune_epochs, lr=p.lr, desc=f"latency step {step}", seed_offset=step))


def _record(step: int, model: "nn.Module", meter: "LatencyMeter", ctx: "PassContext", *, ratio: float) -> dict[str, Any]:
    from toolchain.models import count_macs, count_params

    lat = meter.measure(model, name=f"candidate-{step}")
    return {"step": step, "channel_ratio": round(ratio, 4), "macs": count_macs(model, ctx.input_shape),
            "params": count_params(model), "p50_ms": lat["p50_ms"], "pxx_ms": lat["pxx_ms"],
            "percentile": lat["percentile"], "val_accuracy": ctx.metric(model, ctx.val),
            "test_accuracy": ctx.metric(model, ctx.test), "sha256": lat["sha256"], "cached": lat["cached"]}


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
    ax.plot(xs, ys, "o-", color="tab:blue", label="candidates (step order)")
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
