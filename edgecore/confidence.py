"""Calibrated confidence as the device computes it: softmax with a temperature and a measure.

The bundle's routing block names the measure and the temperature; the agent
and the build both call `confidence`, so the threshold means the same on
every device. Fitting the temperature lives in `calibration.confidence`.
Numpy only.
"""

from __future__ import annotations

import enum
import math
from typing import Callable, Sequence

import numpy as np

__all__ = ["Measure", "softmax", "confidence", "confidence_one", "row_scorer"]


class Measure(str, enum.Enum):
    MAX_PROB = "max_prob"  # top-1 probability
    MARGIN = "margin"  # top-1 minus top-2 probability
    ENTROPY = "entropy"  # 1 - normalised entropy (so that higher = more confident)

    def __str__(self) -> str:
        return self.value


def softmax(logits: np.ndarray, *, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _max_prob_row(row: Sequence[float], temperature: float, top: float | None = None) -> float:
    """``max_prob`` of one row of a few logits in plain floats: a tenth of numpy's per-call cost at this size.

    ``top``: the row's largest value, when the caller has it already.
    """
    if top is None:
        top = max(row)
    exp, total = math.exp, 0.0
    # a plain loop: a quarter less than ``sum`` over a list comprehension (its list) at ten classes
    if temperature == 1.0:
        for v in row:
            total += exp(v - top)
        return 1.0 / total
    inv = 1.0 / temperature
    for v in row:
        total += exp((v - top) * inv)
    return 1.0 / total


def _one_short_row(logits: object) -> bool:
    """Logits of one input with few classes (an array of shape (1, C ≤ 64)): plain floats beat numpy there."""
    return isinstance(logits, np.ndarray) and logits.ndim == 2 and logits.shape[0] == 1 and logits.shape[1] <= 64


def confidence(logits: np.ndarray, *, measure: Measure | str = Measure.MAX_PROB, temperature: float = 1.0) -> np.ndarray:
    """Per-sample confidence in [0, 1] of ``logits`` (N, C); higher = more confident."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    m = Measure.MAX_PROB if measure == "max_prob" else Measure(measure)  # (a str enum: no lookup in the usual case)
    if m is Measure.MAX_PROB:  # the top probability is 1 / sum(exp(z - max z)): no full softmax per input
        if _one_short_row(logits):
            return np.array([_max_prob_row(logits[0].tolist(), float(temperature))])  # a device's one input
        z = np.atleast_2d(np.asarray(logits, dtype=np.float64))
        if temperature != 1.0:
            z = z / float(temperature)
        return 1.0 / np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)
    p = softmax(np.atleast_2d(logits), temperature=temperature)
    if m is Measure.MARGIN:
        if p.shape[1] < 2:
            return np.ones(len(p))
        top2 = np.partition(p, -2, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    c = p.shape[1]
    ent = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)
    return 1.0 - ent / np.log(c) if c > 1 else np.ones(len(p))


def confidence_one(logits: np.ndarray, *, measure: Measure | str = Measure.MAX_PROB, temperature: float = 1.0) -> float:
    """`confidence` of a batch of one (logits of shape (1, C)) as a float: a device's one input."""
    if measure == "max_prob" and temperature > 0 and _one_short_row(logits):
        return _max_prob_row(logits[0].tolist(), float(temperature))
    return float(confidence(logits, measure=measure, temperature=temperature)[0])


def row_scorer(measure: Measure | str = Measure.MAX_PROB, temperature: float = 1.0,
               quant: tuple[float, int, int] | None = None) -> Callable[[Sequence[float]], tuple[int, float]]:
    """``score(row) -> (top class, confidence)`` for one input's output row given as a Python list.

    ``quant = (scale, qmin, qmax)``: the row holds the output's integers ``q`` and the logits are
    ``(q - zero) * scale``; ``max_prob`` then needs no dequantizing, since
    ``1 / sum(exp((l_i - l_top) / T)) == 1 / sum(E[q_top - q_i])`` with ``E[d] = exp(-d * scale / T)``, a table
    of ``qmax - qmin + 1`` floats made here. The top class is the first largest value, as ``argmax``.
    Other measures go through `confidence` (dequantized first), so every path agrees with the build's.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    m = Measure.MAX_PROB if measure == "max_prob" else Measure(measure)
    t = float(temperature)
    if m is Measure.MAX_PROB and quant is not None:
        step = float(quant[0]) / t
        table = [math.exp(-d * step) for d in range(int(quant[2]) - int(quant[1]) + 1)]

        def score_q(row: Sequence[float]) -> tuple[int, float]:
            top = max(row)
            # the row holds the output's integers (typed as the float rows the other scorers take)
            return row.index(top), 1.0 / sum([table[top - v] for v in row])  # type: ignore[call-overload]

        return score_q
    if m is Measure.MAX_PROB:
        def score(row: Sequence[float]) -> tuple[int, float]:
            top = max(row)
            return row.index(top), _max_prob_row(row, t, top)

        return score
    scale = None if quant is None else float(quant[0])

    def score_any(row: Sequence[float]) -> tuple[int, float]:
        z = np.asarray(row, dtype=np.float64)[None]
        if scale is not None:  # the zero point cancels in every measure of a softmax: only the scale matters
            z = z * scale
        return int(z[0].argmax()), float(confidence(z, measure=m, temperature=t)[0])

    return score_any
