"""prune.target = "latency": candidates built for the target runtime, timed, cached; the choice and its errors."""

from __future__ import annotations

import json
import shutil

import pytest

from edgecore.errors import CompressionError, ConfigError
from tests.fixtures.pipeline import tiny_config
from toolchain import pipeline
from toolchain.passes.latency_search import choose

LATENCY = {"target": "latency", "latency_target": "onnx-fp32", "finetune_epochs": 1, "latency_step": 0.3,
           "latency_max_candidates": 2, "latency_extra_steps": 0}


def _cand(step, pxx, val):
    return {"step": step, "pxx_ms": pxx, "p50_ms": pxx, "val_accuracy": val, "percentile": 50.0, "channel_ratio": 0.1 * step}


def test_choose_keeps_the_most_accurate_within_budget_and_names_the_fastest_when_none_fits():
    cands = [_cand(0, 3.0, 0.99), _cand(1, 1.9, 0.95), _cand(2, 1.5, 0.97), _cand(3, 1.0, 0.97)]
    assert choose(cands, 2.0)["step"] == 3  # 0.97 twice within budget: the faster one
    assert choose(cands, 5.0)["step"] == 0
    with pytest.raises(CompressionError, match=r"budget 0.5 ms not met: the fastest of 4 candidates measured 1 ms"):
        choose(cands, 0.5)


def test_config_refuses_a_latency_target_without_budget_or_with_a_bad_margin(tmp_path):
    with pytest.raises(ConfigError, match="latency_budget_ms: must be > 0"):
        tiny_config(tmp_path, prune={"target": "latency"})
    with pytest.raises(ConfigError, match=r"latency_margin: must be in \[0, 1\)"):
        tiny_config(tmp_path, prune={"target": "latency", "latency_budget_ms": 1.0, "latency_margin": 1.0})


def test_latency_search_builds_measures_caches_and_reports_every_candidate(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    # a budget every candidate meets (this test checks behaviour, not this machine's speed): the unpruned
    # student is within it, and with one extra step allowed the search measures exactly one more
    cfg = tiny_config(run_dir, prune={**LATENCY, "latency_budget_ms": 1e4, "latency_extra_steps": 1},
                      compress={"passes": ["prune"], "control": "none"})
    rep = pipeline.compress(cfg, run_dir, show=False)
    s = rep["prune"]["latency"]
    assert [c["step"] for c in s["candidates"]] == [0, 1]
    assert s["built_and_measured"] == 2 and s["cache_hits"] == 0
    first, second = s["candidates"]
    assert second["macs"] < first["macs"] and second["channel_ratio"] == pytest.approx(0.3, abs=0.02)
    assert all(c["p50_ms"] > 0 and len(c["sha256"]) == 64 for c in s["candidates"])
    chosen = [c for c in s["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["val_accuracy"] == max(c["val_accuracy"] for c in s["candidates"])
    saved = json.loads((run_dir / "latency" / "candidates.json").read_text())
    assert saved["candidates"] == s["candidates"]
    assert (run_dir / "latency" / "pareto.png").stat().st_size > 1000

    # the same run again: identical candidates, every measurement from the cache (keyed by the artifact's sha256)
    again = pipeline.compress(cfg, run_dir, show=False)["prune"]["latency"]
    assert again["built_and_measured"] == 0 and again["cache_hits"] == 2
    assert [c["sha256"] for c in again["candidates"]] == [c["sha256"] for c in s["candidates"]]


def test_an_unreachable_budget_fails_naming_the_fastest_candidate(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    cfg = tiny_config(run_dir, prune={**LATENCY, "latency_budget_ms": 1e-6, "latency_max_candidates": 1},
                      compress={"passes": ["prune"], "control": "none"})
    with pytest.raises(CompressionError, match=r"latency budget 1e-06 ms \(with the margin: 9e-07 ms\) not met: the fastest of 2 candidates"):
        pipeline.compress(cfg, run_dir, show=False)
