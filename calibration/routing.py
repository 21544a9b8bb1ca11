"""Routing threshold for an offload budget, and the accuracy-vs-offload curve.

Inputs are sent to the cloud when their calibrated confidence is *below* the
threshold. On held-out data we know, per input, whether the edge model and the
cloud (heavy) model are right; offloading the k least confident inputs gives a
system accuracy for every k. The threshold is the one with the best system
accuracy among those offloading at most the budget (ties: fewer offloads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecore.fsutil import atomic_write_bytes, atomic_write_json

__all__ = ["RoutingChoice", "routing_curve", "choose_threshold", "write_curve"]

CURVE_POINTS = 201


@dataclass(frozen=True)
class RoutingChoice:
    threshold: float
    offload_budget: float
    expected_offload: float
    expected_accuracy: float
    edge_accuracy: float
    cloud_accuracy: float


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
    conf: np.ndarray, edge_correct: np.ndarray, cloud_correct: np.ndarray, *, offload_budget: float
) -> RoutingChoice:
    off, acc, thr = routing_curve(conf, edge_correct, cloud_correct)
    allowed = np.flatnonzero(off <= offload_budget + 1e-12)
    k = int(allowed[np.argmax(acc[allowed])])  # argmax takes the first (fewest offloads) on ties
    t = float(thr[k])
    conf = np.asarray(conf, dtype=np.float64)
    mask = conf < t  # what the device will really do (ties in confidence move together)
    system = np.where(mask, cloud_correct, edge_correct).mean() if len(conf) else 0.0
    return RoutingChoice(
        threshold=t,
        offload_budget=float(offload_budget),
        expected_offload=float(mask.mean()) if len(conf) else 0.0,
        expected_accuracy=float(system),
        edge_accuracy=float(np.mean(edge_correct)),
        cloud_accuracy=float(np.mean(cloud_correct)),
    )


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
                   "offload_budget": choice.offload_budget},
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
            label=f"threshold {choice.threshold:.3f}")
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
