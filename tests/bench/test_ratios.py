"""One definition of every hw-bench ratio: the median of per-round ratios, with its min–max over rounds."""

from __future__ import annotations

import pytest

from hw_bench.ratios import Ratio, paired, pooled
from hw_bench.report import int8_vs_fp32, speedup_text


def test_paired_rounds_give_the_median_and_range_printed_to_the_digits_the_spread_allows():
    r = paired([2.0, 3.0, 2.2], [1.0, 1.0, 1.0])
    assert (r.median, r.lo, r.hi, r.rounds) == (2.2, 2.0, 3.0, 3)
    assert str(r) == "2× (2–3)"  # a spread of 1.0: no decimal is worth printing
    assert str(paired([1.83, 1.85, 1.84], [1, 1, 1])) == "1.84× (1.83–1.85)"
    assert str(paired([1.5], [1.0])) == "1.50×"
    assert str(pooled(3.0, 2.0)) == "1.50× (pooled)"
    with pytest.raises(ValueError):
        paired([1.0, 2.0], [1.0])


def _row(precision: str, scores: list[float], p50: float, run: int = 0) -> dict:
    return {"model": "m", "target": "onnx", "scenario": "single-stream", "precision": precision,
            "device_id": None, "latency_ms": {"p50": p50}, "throughput_sps": 1000 / p50, "round_scores": scores,
            "_run": run}


def test_int8_vs_fp32_pairs_the_rounds_as_the_speedup_vs_pytorch_does():
    # per-round 1/p50: fp32 1, 1, 1 ms; int8 0.5, 0.9, 0.6 ms -> ratios 2.0, 1.11, 1.67; median 1.67
    fp32 = _row("fp32", [1.0, 1.0, 1.0], p50=1.0)
    int8 = _row("int8", [2.0, 1 / 0.9, 1 / 0.6], p50=0.55)  # pooled p50 ratio would say 1.82
    (x,) = int8_vs_fp32([fp32, int8])
    assert x["speedup"] == pytest.approx(1 / 0.6) and x["speedup_rounds"] == 3
    assert x["speedup_range"] == pytest.approx([1 / 0.9, 2.0])
    # rows of two different runs have no rounds to pair: pooled, and said
    (y,) = int8_vs_fp32([fp32, {**int8, "_run": 1}])
    assert y["speedup"] == pytest.approx(1.0 / 0.55) and y["speedup_rounds"] == 0 and "pooled" in y["speedup_text"]


def test_a_rows_speedup_vs_pytorch_prints_its_range():
    row = {"speedup_vs_pytorch": 2.5, "speedup_range": [2.1, 2.9], "round_scores": [1, 2, 3]}
    assert speedup_text(row) == "2.5× (2.1–2.9)"
    assert speedup_text({"speedup_vs_pytorch": None}) == "–"
    assert speedup_text({"speedup_vs_pytorch": 1.0}) == "1.00×"  # the baseline itself


def test_ratio_digits():
    assert Ratio(1.0, 0.9, 1.1, 3).digits() == 1 and Ratio(1.0, 0.99, 1.01, 3).digits() == 2
    assert Ratio(1.0, 1.0, 1.0, 3).digits() == 2
