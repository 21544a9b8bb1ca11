"""``hw-bench agent``: the bare runtime and the agent's per-input path on the same inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hw_bench.cli import main
from hw_bench.data import TestData, save_npz


def test_agent_bench_reports_both_paths_and_the_ratio(tiny_bundle: Path, tiny_data: TestData, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    npz = tmp_path / "data.npz"
    save_npz(npz, tiny_data)
    assert main(["agent", str(tiny_bundle), "--data", str(npz), "--rounds", "3", "--warmup", "5", "--json",
                 "--allow-unsigned"]) == 0
    out = capsys.readouterr().out
    rec = json.loads(out.strip().splitlines()[-1])
    assert "agent overhead" in out and "bare" in out  # the table
    assert rec["inputs"] == len(tiny_data) and rec["rounds"] == 3
    for path in ("bare", "agent"):
        s = rec[path]
        assert s["count"] == 3 * len(tiny_data)
        assert 0 < s["p50_us"] <= s["p99_us"] and s["p99_over_p50"] == pytest.approx(s["p99_us"] / s["p50_us"])
        assert 0 < s["cpu"]["p50_us"] <= s["cpu"]["p99_us"]
    assert rec["agent_overhead"] == pytest.approx(rec["agent"]["p50_us"] / rec["bare"]["p50_us"])
    assert rec["agent_overhead_cpu"] == pytest.approx(rec["agent"]["cpu"]["p50_us"] / rec["bare"]["cpu"]["p50_us"])
    assert rec["goal"]["met"] == (rec["agent_overhead"] <= 1.15 and rec["agent"]["p99_over_p50"] <= 3.0)
    assert len(rec["load_avg"]["start"]) == 3 and rec["env"]["cpu"]["logical_cores"] >= 1
    assert "steal_pct" in rec
    assert rec["runtime_threads"] == 1  # a tiny model: one runtime thread by default on the device
    assert 0.0 <= rec["agent_accuracy"] <= 1.0


def test_agent_bench_threads_zero_is_the_runtime_default(tiny_bundle: Path, tiny_data: TestData, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    npz = tmp_path / "data.npz"
    save_npz(npz, tiny_data)
    assert main(["agent", str(tiny_bundle), "--data", str(npz), "--rounds", "1", "--threads", "0", "--json",
                 "--allow-unsigned"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["threads"] == 0 and rec["runtime_threads"] is None


def test_agent_bench_threshold_sends_inputs_down_the_uncertain_path(tiny_bundle: Path, tiny_data: TestData,
                                                                    tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """--threshold overrides the bundle's: 1.0 sends every input down the uncertain path (a local fallback
    without a broker, still answered), 0.0 none; the record says which share took it."""
    npz = tmp_path / "data.npz"
    save_npz(npz, tiny_data)
    shares = {}
    for t in ("1.0", "0.0"):
        assert main(["agent", str(tiny_bundle), "--data", str(npz), "--rounds", "1", "--warmup", "2",
                     "--threshold", t, "--json", "--allow-unsigned"]) == 0
        out = capsys.readouterr().out
        rec = json.loads(out.strip().splitlines()[-1])
        assert rec["threshold"] == float(t) and "of the inputs took the uncertain path" in out
        assert 0.0 <= rec["agent_accuracy"] <= 1.0 and rec["agent"]["count"] == len(tiny_data)
        shares[t] = rec["uncertain_share"]
    assert shares["0.0"] == 0.0 and shares["1.0"] > 0.9  # (a softmax can round to exactly 1.0 in float32)
    assert main(["agent", str(tiny_bundle), "--data", str(npz), "--threshold", "1.5", "--allow-unsigned"]) == 2
    assert "--threshold is a confidence in [0, 1], got 1.5" in capsys.readouterr().err


def test_agent_bench_refuses_missing_or_mismatched_inputs(tiny_bundle: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", str(tiny_bundle)]) == 2
    assert "--run RUN_DIR" in capsys.readouterr().err
    npz = tmp_path / "wrong.npz"
    save_npz(npz, TestData(np.zeros((4, 3, 8, 8), np.float32), np.zeros(4, np.int64), "wrong"))
    assert main(["agent", str(tiny_bundle), "--data", str(npz), "--allow-unsigned"]) == 2
    assert "the bundle takes [1, 8, 8]" in capsys.readouterr().err
    assert main(["agent", str(tiny_bundle), "--data", str(npz)]) == 2  # unsigned, and no --allow-unsigned
    assert "signatures are required" in capsys.readouterr().err
