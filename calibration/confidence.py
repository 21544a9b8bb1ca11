"""Calibrated confidence: temperature scaling and the confidence measures.

Numpy only: the device agent computes the same confidence as the build did,
with the temperature and measure written into the bundle's routing block.
Higher is always more confident; the agent offloads an input when its
confidence is *below* the bundle's threshold.

Why temperature scaling: a distilled, quantized student is usually
over-confident; one scalar ``T`` fitted on the validation split (minimising
negative log-likelihood) fixes most of it without changing the argmax, so the
routing threshold means the same thing on every device (Guo et al., 2017).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecore.confidence import Measure, confidence, softmax

__all__ = ["Measure", "softmax", "confidence", "fit_temperature", "ece", "TemperatureFit", "calibrate"]


def _nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    z = logits / t
    z = z - z.max(axis=1, keepdims=True)
    logz = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(logz - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, y: np.ndarray, *, lo: float = 0.05, hi: float = 20.0) -> float:
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

    def to_dict(self) -> dict[str, float]:
        return {
            "temperature": self.temperature,
            "ece_before": self.ece_before,
            "ece_after": self.ece_after,
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
        }


def calibrate(logits: np.ndarray, y: np.ndarray) -> TemperatureFit:
    """Fit T on validation logits and report ECE/NLL before and after."""
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    t = fit_temperature(logits, y)
    return TemperatureFit(
        temperature=t,
        ece_before=ece(logits, y),
        ece_after=ece(logits, y, temperature=t),
        nll_before=_nll(logits, y, 1.0),
        nll_after=_nll(logits, y, t),
    )
