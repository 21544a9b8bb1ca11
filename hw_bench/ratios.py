"""Every speed-up hw-bench reports has one definition: the median over interleaved rounds of the per-round ratio,
printed with its min–max over those rounds, to the digits the spread allows.

A "speed-up vs PyTorch" and an "int8 vs fp32" of the same rows therefore agree: both pair the rounds of the same
run (each round measures every contender once, in rotating order) and take the median of the paired ratios.
Rows measured in different runs have no rounds to pair: their ratio is the ratio of the pooled p50s and says so
(``rounds = 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["Ratio", "paired", "pooled", "row_scores"]


@dataclass(frozen=True)
class Ratio:
    median: float
    lo: float
    hi: float
    rounds: int  # paired rounds behind it; 0: a ratio of pooled figures (rows from different runs)

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.lo, "max": self.hi, "rounds": self.rounds}

    def digits(self) -> int:
        """Decimals worth printing: the first one the spread over rounds leaves standing (2 without a spread)."""
        spread = self.hi - self.lo
        if self.rounds < 2 or spread <= 0:
            return 2
        return int(min(3, max(0, -math.floor(math.log10(spread)))))

    def __str__(self) -> str:
        d = self.digits()
        if self.rounds < 2 or self.hi - self.lo <= 0:
            return f"{self.median:.{d}f}×" + ("" if self.rounds else " (pooled)")
        return f"{self.median:.{d}f}× ({self.lo:.{d}f}–{self.hi:.{d}f})"


def paired(numer: Sequence[float], denom: Sequence[float]) -> Ratio:
    """Round by round ``numer[i] / denom[i]`` (higher-is-better scores: 1/p50, samples/s), its median and range."""
    if len(numer) != len(denom) or not numer:
        raise ValueError(f"paired rounds: {len(numer)} against {len(denom)}")
    r = np.asarray(numer, dtype=np.float64) / np.asarray(denom, dtype=np.float64)
    return Ratio(float(np.median(r)), float(r.min()), float(r.max()), len(r))


def pooled(numer: float, denom: float) -> Ratio:
    v = float(numer) / float(denom)
    return Ratio(v, v, v, 0)


def row_scores(row: dict[str, Any]) -> list[float] | None:
    """The row's per-round scores (1/p50 single-stream, samples/s offline), when it recorded them."""
    s = row.get("round_scores")
    return [float(x) for x in s] if isinstance(s, list) and s else None
