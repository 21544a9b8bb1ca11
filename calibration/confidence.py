"""Calibrated confidence: temperature scaling and the confidence measures.

Numpy only: the device agent computes the same confidence as the build did,
with the temperature and measure written into the bundle's routing block.
Higher is always more confident; the agent offloads an input when its
confidence is *below* the bundle's threshold.

Why temperature scaling: a distilled, quantized student is usually
over-confident; one scalar ``T`` fitted on the validation split (minimising
negative log-likelihood) fixes most of it without changing the argmax, so the
routing threshold means the same thing on every device (Guo et al., 2017).

Why bounded: on a small validation split the student often classifies every
sample right; the NLL then keeps falling as T -> 0 and the fit lands on the
search's edge (T = 0.05 on 27 samples), which saturates every confidence at 1.0
and leaves routing nothing to rank. The fewer the samples, the closer to 1 T
is kept (`temperature_bounds`); the build warns with the numbers when it bounds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edgecore.confidence import Measure, confidence, softmax

__all__ = [
    "Measure", "softmax", "confidence", "fit_temperature", "temperature_bounds", "ece", "TemperatureFit", "calibrate",
]

log = logging.getLogger(__name__)

SEARCH_RANGE = (0.05, 20.0)


def _nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    z = logits / t
    z = z - z.max(axis=1, keepdims=True)
    logz = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(logz - z[np.arange(len(y)), y]))


def temperature_bounds(n: int) -> tuple[float, float]:
    """Where T may lie after a fit on ``n`` samples: [1/s, s] with s = n/20 kept in [2, 20].

    27 samples: [0.5, 2]; 100: [0.2, 5]; 400 and more: the whole search range.
    """
    s = float(np.clip(n / 20.0, 2.0, SEARCH_RANGE[1]))
    return max(1.0 / s, SEARCH_RANGE[0]), s


def fit_temperature(
    logits: np.ndarray, y: np.ndarray, *, lo: float = SEARCH_RANGE[0], hi: float = SEARCH_RANGE[1]
) -> float:
    """Temperature minimising the NLL of ``y`` (golden-section search on log T).

    NLL is convex in 1/T, so a 1-D search is exact enough and needs no optimiser.
    """
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    a, b = np.log(lo), np.log(hi)
    g = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = _nll(logits, y, np.exp(c)), _nll(logits, y, np.exp(d))
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = _nll(logits, y, np.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = _nll(logits, y, np.exp(d))
    return float(np.exp((a + b) / 2.0))


def ece(logits: np.ndarray, y: np.ndarray, *, temperature: float = 1.0, bins: int = 15) -> float:
    """Expected calibration error of the top-1 probability (equal-width bins)."""
    p = softmax(logits, temperature=temperature)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == np.asarray(y)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            total += mask.mean() * abs(conf[mask].mean() - correct[mask].mean())
    return float(total)


@dataclass(frozen=True)
class TemperatureFit:
    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    fitted: float = 0.0  # the NLL optimum over the whole search range, before bounding
    bounds: tuple[float, float] = SEARCH_RANGE
    n: int = 0

    @property
    def bounded(self) -> bool:
        return not np.isclose(self.temperature, self.fitted, rtol=1e-6)

    def to_dict(self) -> dict[str, float | bool | list[float]]:
        return {
            "temperature": self.temperature,
            "ece_before": self.ece_before,
            "ece_after": self.ece_after,
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
            "temperature_fitted": self.fitted,
            "temperature_bounds": list(self.bounds),
            "bounded": self.bounded,
        }


def calibrate(logits: np.ndarray, y: np.ndarray) -> TemperatureFit:
    """Fit T on validation logits (bounded by the split's size) and report ECE/NLL before and after."""
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    fitted = fit_temperature(logits, y)
    lo, hi = temperature_bounds(len(y))
    t = float(np.clip(fitted, lo, hi))  # NLL is convex in 1/T: the bounded optimum is the clipped one
    fit = TemperatureFit(
        temperature=t,
        ece_before=ece(logits, y),
        ece_after=ece(logits, y, temperature=t),
        nll_before=_nll(logits, y, 1.0),
        nll_after=_nll(logits, y, t),
        fitted=fitted,
        bounds=(lo, hi),
        n=len(y),
    )
    edge = fitted <= SEARCH_RANGE[0] * 1.01 or fitted >= SEARCH_RANGE[1] * 0.99
    if fit.bounded or edge:
        acc = float((logits.argmax(1) == y).mean()) if len(y) else 0.0
        log.warning(
            "temperature: the NLL fit on %d validation samples (accuracy %.1f%%) gives T=%.3g%s; %s",
            len(y), acc * 100, fitted, " (the edge of the search range: no optimum inside)" if edge else "",
            f"bounded to [{lo:.3g}, {hi:.3g}] for a split this size: T={t:.3g}" if fit.bounded else "kept",
        )
    return fit
