"""``toolchain demo``: the whole story wired together, through a real broker.

The default test reuses the shared tiny run and builds two targets, so it takes
seconds; the slow test runs ``make demo``'s command itself, from training on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_gateway.broker import find_mosquitto
from edge_demo.story import FLEET, DemoOptions, drifted, run_demo
from edgecore.errors import UnknownTargetError

pytestmark = pytest.mark.broker


def _needs_mosquitto() -> None:
    if find_mosquitto() is None:
        msg = "mosquitto is not installed (apt-get install mosquitto)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def _check_summary(out: Path, summary: dict, *, n_test: int) -> None:
    for name in ("summary.json", "summary.md", "bench/report.md", "bench/latency.png", "bench/pareto.png",
                 "routing_curve.png"):
        assert (out / name).is_file(), f"demo left no {name}"
    assert json.loads((out / "summary.json").read_text())["out"] == str(out.resolve())
    devices = {d["device"]: d for d in summary["fleet"]["devices"]}
    assert set(devices) == {d for d, _, _ in FLEET}
    for d in devices.values():
        assert d["inputs"] == n_test  # every input answered
        assert d["p50_ms"] is not None and d["p99_ms"] >= d["p50_ms"]
    # the drifted device is flagged, the others are not, and it is visibly worse
    assert devices["edge-3"]["drift_flag"] is True
    assert devices["edge-1"]["drift_flag"] is False and devices["edge-2"]["drift_flag"] is False
    assert devices["edge-3"]["accuracy"] < devices["edge-1"]["accuracy"]
    # the gateway saw every device's telemetry
    seen = json.dumps(summary["fleet"]["gateway_view"])
    assert all(d in seen for d in devices)
    md = (out / "summary.md").read_text()
    assert "**DRIFT**" in md and "| edge-1 |" in md


def test_demo_on_a_finished_run(tiny_run: Path, tmp_path: Path) -> None:
    _needs_mosquitto()
    out = tmp_path / "demo"
    shutil.copytree(tiny_run, out / "run")
    summary = run_demo(DemoOptions(out=out, reuse=True, targets=("onnx", "openvino"), rate_hz=0, window_s=0.3,
                                   bench_seconds=0.2))
    from toolchain.rundir import RunDir

    _check_summary(out, summary, n_test=len(RunDir(out / "run").splits().test[1]))
    assert set(summary["bundles"]) == {"onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-fp16", "openvino-int8"}
    assert {d["device"]: d["bundle"] for d in summary["fleet"]["devices"]} == {
        "edge-1": "onnx-int8", "edge-2": "openvino-int8", "edge-3": "onnx-int8"}  # no tflite: edge-3 falls back
    bench = {r["artifact"] for r in summary["bench"]["rows"]}
    assert any("pytorch" in a for a in bench) and len(bench) == 6  # PyTorch baseline + 5 bundles
    # the closed loop ran on the drifted device: collected, refreshed, rolled out; the broken bundle rolled back
    loop = json.loads((out / "summary.json").read_text())["refresh"]
    assert loop["collected"][0]["device"] == "edge-3" and loop["collected"][0]["samples"] > 20
    assert {"accuracy", "offload_rate", "drift_flag"} <= set(loop["before"]) <= set(loop["after"]) | {"bundle"}
    assert loop["after"]["inputs"] == len(RunDir(out / "run").splits().test[1])
    # the device's model alone, no cloud (the tiny teacher is no better than chance on the drifted stream, so the
    # refreshed tiny student need not be either: the gain is checked at full size, in the slow test)
    assert all(0 <= loop[k]["student_accuracy"] <= 1 for k in ("before", "after"))
    assert 0 <= loop["test_accuracy_original"] <= 1 and (out / "run-refresh" / "reports" / "refresh.json").is_file()
    assert loop["rollout"]["state"] in ("done", "rolled_back") and loop["rollout"]["steps"][0] == "started"
    assert loop["bad_rollout"]["state"] == "failed" and loop["bad_rollout"]["devices_on_it"] == []
    assert "canary update failed" in loop["bad_rollout"]["steps"]
    assert "## Closed loop (drifted device)" in (out / "summary.md").read_text()


def test_demo_rejects_an_unknown_target_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    with pytest.raises(UnknownTargetError, match="unknown target 'tensorflow'; available: onnx"):
        run_demo(DemoOptions(out=out, targets=("tensorflow",)))  # no run yet: it would train first
    assert not out.exists()


def test_drifted_stream_moves_input_statistics() -> None:
    import numpy as np

    x = np.random.default_rng(1).uniform(0, 16, size=(50, 1, 8, 8)).astype(np.float32)
    d = drifted(x)
    assert d.shape == x.shape and d.dtype == np.float32
    assert d.min() >= x.min() and d.max() <= x.max()
    assert not np.allclose(d, x)


@pytest.mark.slow
def test_make_demo_command_end_to_end(tmp_path: Path) -> None:
    """What `make demo` runs, from training on: every installed target, a few minutes."""
    _needs_mosquitto()
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "toolchain.cli", "demo", "--out", str(out), "--json"],
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    from toolchain.rundir import RunDir

    _check_summary(out, summary, n_test=len(RunDir(out / "run").splits().test[1]))
    assert summary["failed_builds"] == []
    for name in ("onnx-int8", "openvino-int8", "tflite-int8"):
        m = summary["bundles"][name]["metrics"]
        assert m["accuracy"] >= m["reference_accuracy"] - 0.01
    # the closed loop at full size (issue 13's acceptance): refresh and evaluation inputs are disjoint
    # (collected from drifted training images, evaluated on the drifted test split)
    loop = summary["refresh"]
    assert "refresh_error" not in loop, loop.get("refresh_error")
    assert loop["bad_rollout"]["state"] == "failed" and loop["bad_rollout"]["devices_on_it"] == []
    before, after = loop["before"], loop["after"]
    original = next(g for g in loop["gates"] if g["gate"] == "original test split")
    teacher = loop["teacher_accuracy_drifted"]
    goals = {
        # the "+20 pt" on the device's accuracy cannot be reached when the device already sent most drifted
        # inputs to the teacher (seed-dependent: then its accuracy before is within a few points of the teacher's);
        # the gain is asked of the device's own model, the cascade's accuracy must reach the teacher's level
        "device model alone +20 pt": after["student_accuracy"] >= before["student_accuracy"] + 0.20,
        "within 5 pt of the teacher": after["accuracy"] >= teacher - 0.05,
        "offload lower": after["offload_rate"] < before["offload_rate"],
        "original split within 0.5 pt": original["lost_pt"] <= 0.5,
        "canary promoted": loop["rollout"]["state"] == "done",
        "drift cleared": before["drift_flag"] and not after["drift_flag"],
    }
    assert all(goals.values()), (f"closed-loop acceptance: {goals}; before {before}, after {after}, "
                                 f"teacher {teacher:.3f}")
