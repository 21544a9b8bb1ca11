"""Routing threshold for an offload budget, and the accuracy-vs-offload curve.

Inputs are sent to the cloud when their calibrated confidence is *below* the
threshold. On held-out data we know, per input, whether the edge model and the
cloud (heavy) model are right (or, for tasks whose answers are partly right, how right: the task's quality in
[0, 1], a detector's per-image AP); offloading the k least confident inputs gives a
system accuracy for every k. The threshold is the one with the best system
accuracy among those offloading at most the budget (ties: fewer offloads):
rule ``accuracy``.

When offloading never raises accuracy on the validation split although the
cloud is at least as accurate as the edge (typically: the student matches the
teacher on a small split), that rule offloads nothing, and routing would be off
for good. Then the threshold is taken from the confidence distribution instead:
it spends the budget on the least confident inputs (rule ``budget_quantile``),
and a warning gives the numbers. So does a cloud less accurate than the edge by
a margin a paired test cannot tell from chance (the exact sign test on the
inputs where they differ, McNemar's for right/wrong: p >= 0.05): the split is
too small to say the cloud is worse, and a budget the user granted is spent
unless the evidence says it hurts. A cloud significantly less accurate keeps
routing off (rule ``accuracy``), with a warning too. The rule and why are
recorded in the bundle's routing block.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecore.fsutil import atomic_write_bytes, atomic_write_json

__all__ = ["ACCURACY", "BUDGET_QUANTILE", "RoutingChoice", "routing_curve", "choose_threshold", "write_curve"]

CURVE_POINTS = 201

log = logging.getLogger(__name__)

ACCURACY = "accuracy"  # best system accuracy on validation within the budget
BUDGET_QUANTILE = "budget_quantile"  # offload the budget's share of the least confident inputs


WORSE_P = 0.05  # a cloud worse than the edge at this p (paired) keeps routing off


def sign_test(a: int, b: int) -> float:
    """Two-sided exact sign test (McNemar's exact test on the discordant pairs): the probability, were the two
    equally good, of a split of ``a + b`` differing inputs at least as uneven as ``a`` to ``b``."""
    n = a + b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a, b) + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class RoutingChoice:
    threshold: float
    offload_budget: float
    expected_offload: float
    expected_accuracy: float
    edge_accuracy: float
    cloud_accuracy: float
    rule: str = ACCURACY
    reason: str = ""


def routing_curve(
    conf: np.ndarray, edge_correct: np.ndarray, cloud_correct: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offload fraction, system accuracy, threshold) for offloading the k least confident, k = 0..n."""
    conf = np.asarray(conf, dtype=np.float64)
    order = np.argsort(conf, kind="stable")
    c = conf[order]
    e = np.asarray(edge_correct, dtype=np.float64)[order]
    g = np.asarray(cloud_correct, dtype=np.float64)[order]
    n = len(c)
    # k offloaded: cloud answers the first k, edge the rest
    cloud_cum = np.concatenate([[0.0], np.cumsum(g)])
    edge_tail = np.concatenate([np.cumsum(e[::-1])[::-1], [0.0]])
    acc = (cloud_cum + edge_tail) / max(n, 1)
    thr = np.empty(n + 1)
    thr[0] = 0.0  # nothing is below 0
    thr[1:n] = (c[:-1] + c[1:]) / 2.0
    thr[n] = np.nextafter(1.0, 2.0) if n else 1.0  # everything is below
    return np.arange(n + 1) / max(n, 1), acc, thr


def choose_threshold(
    conf: np.ndarray, edge_correct: np.ndarray, cloud_correct: np.ndarray, *, offload_budget: float,
    split: str = "validation",
) -> RoutingChoice:
    """The threshold for ``offload_budget`` (see the module's doc for the two rules); ``split`` names the inputs
    it is fitted on in what it says (the calibration split, or the validation split)."""
    conf = np.asarray(conf, dtype=np.float64)
    # per-input quality in [0, 1]: 1/0 for a class that is right or wrong, a score for detections
    edge_correct = np.asarray(edge_correct, dtype=np.float64)
    cloud_correct = np.asarray(cloud_correct, dtype=np.float64)
    off, acc, thr = routing_curve(conf, edge_correct, cloud_correct)
    allowed = np.flatnonzero(off <= offload_budget + 1e-12)
    k = int(allowed[np.argmax(acc[allowed])])  # argmax takes the first (fewest offloads) on ties
    n = len(conf)
    rule, reason = ACCURACY, ""
    if k == 0 and offload_budget > 0 and n:
        edge_acc, cloud_acc = float(edge_correct.mean()), float(cloud_correct.mean())
        helps = int(np.sum(cloud_correct > edge_correct))
        facts = (f"on the {n}-sample {split} split offloading never raises accuracy (edge {edge_acc:.1%}, "
                 f"cloud {cloud_acc:.1%}, {helps} input(s) the cloud answers better), so the accuracy rule "
                 f"offloads nothing (threshold 0.0)")
        worse = int(np.sum(edge_correct > cloud_correct))
        p = sign_test(worse, helps)
        if cloud_acc >= edge_acc or p >= WORSE_P:
            rule = BUDGET_QUANTILE
            k = max(1, int(np.floor(offload_budget * n + 1e-9)))
            why = "" if cloud_acc >= edge_acc else (
                f"; the cloud is less accurate there by {worse - helps} input(s) of {n}, which a paired test cannot "
                f"tell from chance (exact sign test p={p:.2f})")
            reason = f"{facts}{why}; the budget is spent on the least confident inputs instead"
        else:
            reason = (f"{facts}; the cloud is less accurate than the edge there ({worse} input(s) the edge answers "
                      f"better, {helps} the cloud; exact sign test p={p:.3f}), so nothing is offloaded")
    return _choice(conf, edge_correct, cloud_correct, float(thr[k]), offload_budget, rule, reason, split)


def _choice(
    conf: np.ndarray, edge_correct: np.ndarray, cloud_correct: np.ndarray, t: float, budget: float, rule: str,
    reason: str, split: str = "validation",
) -> RoutingChoice:
    n = len(conf)
    mask = conf < t  # what the device will really do (ties in confidence move together)
    ch = RoutingChoice(
        threshold=t,
        offload_budget=float(budget),
        expected_offload=float(mask.mean()) if n else 0.0,
        expected_accuracy=float(np.where(mask, cloud_correct, edge_correct).mean()) if n else 0.0,
        edge_accuracy=float(np.mean(edge_correct)) if n else 0.0,
        cloud_accuracy=float(np.mean(cloud_correct)) if n else 0.0,
        rule=rule,
        reason=reason,
    )
    if reason:
        log.warning("routing: %s: threshold %.4g offloads %d of %d %s inputs (%.1f%%, budget %.1f%%)",
                    reason, t, int(mask.sum()), n, split, ch.expected_offload * 100, budget * 100)
    return ch


def write_curve(
    out_dir: Path, conf: np.ndarray, edge_correct: np.ndarray, cloud_correct: np.ndarray, *, choice: RoutingChoice,
    title: str = "",
) -> tuple[str, str]:
    """routing_curve.json + routing_curve.png in ``out_dir``; returns their names."""
    off, acc, thr = routing_curve(conf, edge_correct, cloud_correct)
    idx = np.unique(np.linspace(0, len(off) - 1, min(CURVE_POINTS, len(off))).round().astype(int))
    data: dict[str, Any] = {
        "offload": off[idx].tolist(),
        "accuracy": acc[idx].tolist(),
        "threshold": thr[idx].tolist(),
        "chosen": {"threshold": choice.threshold, "offload": choice.expected_offload, "accuracy": choice.expected_accuracy,
                   "offload_budget": choice.offload_budget, "rule": choice.rule},
    }
    atomic_write_json(Path(out_dir) / "routing_curve.json", data)
    atomic_write_bytes(Path(out_dir) / "routing_curve.png", _plot(off, acc, choice, title))
    return "routing_curve.json", "routing_curve.png"


def _plot(off: np.ndarray, acc: np.ndarray, choice: RoutingChoice, title: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    ax.plot(off * 100, acc * 100, lw=1.8, label="edge + cloud")
    ax.axhline(choice.edge_accuracy * 100, color="gray", ls=":", lw=1, label="edge only")
    ax.axhline(choice.cloud_accuracy * 100, color="gray", ls="--", lw=1, label="cloud only")
    ax.axvline(choice.offload_budget * 100, color="tab:red", ls=":", lw=1, label="offload budget")
    ax.plot([choice.expected_offload * 100], [choice.expected_accuracy * 100], "o", color="tab:red",
            label=f"threshold {choice.threshold:.3f} ({choice.rule})")
    ax.set_xlabel("inputs sent to the cloud (%)")
    ax.set_ylabel("system accuracy (%)")
    ax.set_title(title or "accuracy vs offload (validation split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
