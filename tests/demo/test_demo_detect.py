"""``toolchain demo --task detect``: the story on generated shapes scenes, scored in mAP, through a real broker.

The default tests reuse the tiny detection run (`det_run`, tests/fixtures/detection.py), build one target and
stream a few dozen frames per camera; the slow test runs the command itself, from training on, and checks the
time it promises and the loop's gain.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_demo.scenarios import Shapes, get_scenario
from edge_demo.story import FLEET, DemoOptions, answers_metric, run_demo, stream_answers
from edgecore.errors import ConfigError
from tests.demo.test_demo import _needs_mosquitto

MAP = "mAP@0.5:0.95"


def _quick_refresh(run: Path) -> None:
    """One short continuation for the loop, and gates the tiny run can pass (the default is minutes)."""
    from toolchain.config import from_dict, load_config, to_dict, to_toml

    raw = to_dict(load_config(run / "config.toml"))
    raw["refresh"].update({"epochs": 1, "candidates": 1, "strategy": "continue", "max_regression_pt": 100.0,
                           "min_samples": 10})
    (run / "config.toml").write_text(to_toml(from_dict(raw, origin="test")))


def _teacher_onnx(run: Path) -> None:
    """The gateway's teacher.onnx (the tiny run exports none), so that ``--reuse`` finds a finished run."""
    from toolchain.export import export_onnx
    from toolchain.rundir import RunDir

    r = RunDir(run)
    export_onnx(r.load_teacher(), run / RunDir.TEACHER_ONNX, input_shape=r.input_spec.sample_shape, opset=18)


def test_shapes_streams_are_later_scenes_and_their_drifted_twins(det_run, monkeypatch) -> None:
    from toolchain.detection.shapes import generate
    from toolchain.rundir import RunDir

    monkeypatch.setattr(Shapes, "frames", 6)
    monkeypatch.setattr(Shapes, "field_frames", 4)
    s = get_scenario("detect").streams(det_run)
    rec = RunDir(det_run).data_record()
    (xc, yc), (xd, yd), (xf, yf) = s.clean, s.drifted, s.field
    assert len(yf) == len(xf)
    assert xc.shape == xd.shape == (6, 3, 64, 64) and xf.shape == (4, 3, 64, 64) and xc.dtype == np.float32
    assert yc.ndim == 3 and yc.shape[2] == 5  # the task's padded objects
    # the frames after the data set's: no camera streams an image the run trained, validated or tested on
    assert np.array_equal(xc, generate(rec["count"] + 6, size=64).images[-6:].astype(np.float32))
    held = RunDir(det_run).splits()
    seen = {x.tobytes() for part in (held.train, held.val, held.test) for x in part[0]}
    assert not any(x.tobytes() in seen for x in np.concatenate([xc, xd, xf]))
    # the drifted camera: the same scenes drifted (with their boxes: a smaller object has another), not the clean frames
    twin = generate(6, size=64, first=rec["count"], drift=Shapes.drift)
    assert not np.allclose(xc, xd) and np.array_equal(xd, twin.images.astype(np.float32))
    assert np.array_equal((yd[..., 0] >= 0).sum(1), (yc[..., 0] >= 0).sum(1))  # same objects in each scene
    # the loop collects other drifted scenes than those the device is scored on
    assert not any(np.array_equal(f, d) for f in xf for d in xd)


def test_a_detect_demo_config_must_be_shapes(tmp_path: Path) -> None:
    cfg = tmp_path / "yolo.toml"
    cfg.write_text(f'task = "detect"\n[data]\nsource = "yolo:{tmp_path}"\n')
    with pytest.raises(ConfigError, match='needs data.source = "shapes"'):
        get_scenario("detect").config(cfg)
    default, where = get_scenario("detect").config(None)
    assert where == "defaults" and default.data.source == "shapes" and default.task.name == "detect"
    with pytest.raises(ConfigError, match="unknown task 'segment'; available: classify, detect"):
        run_demo(DemoOptions(out=tmp_path / "demo", task="segment"))
    assert not (tmp_path / "demo").exists()


def test_device_answers_score_as_the_bundle_alone(det_run, tmp_path, monkeypatch) -> None:
    """The devices' mAP comes from their answers in the stream's order: edge-only answers score exactly what the
    bundle's model alone scores on the same frames (`toolchain.refresh.gates.bundle_accuracy`)."""
    from device_agent.agent import Agent, AgentConfig
    from tests.agent.tiny import release_trust, signing_key
    from tests.detection.test_pipeline import _build_cfg
    from toolchain.bundle import build_bundle
    from toolchain.refresh.gates import bundle_accuracy
    from toolchain.rundir import RunDir

    monkeypatch.setattr(Shapes, "frames", 40)
    monkeypatch.setattr(Shapes, "field_frames", 0)
    bundle = Path(build_bundle(run_dir=det_run, target="onnx", precision="fp32", cfg=_build_cfg(),
                               out=tmp_path / "b", signing_key=signing_key())["bundle"])
    x, y = get_scenario("detect").streams(det_run).clean
    agent = Agent(bundle, AgentConfig(device_id="cam-1", state_dir=tmp_path / "state", threshold=0.0,
                                      batch_size=8, threads=1, trust=release_trust())).start()
    try:
        answers = stream_answers(agent, x, 0)
    finally:
        agent.stop()
    task = RunDir(det_run).task
    got = answers_metric(task, answers, y)
    alone = bundle_accuracy(bundle, x, y)
    assert alone > 0.0, "the tiny detector finds nothing on the stream: nothing is tested"
    assert got == pytest.approx(alone, abs=2e-3)
    # in another order the same answers score less: the order is what is checked
    assert answers_metric(task, answers[::-1], y) < got - 0.01


def test_detect_demo_on_a_finished_run(det_run, tmp_path, monkeypatch) -> None:
    _needs_mosquitto()
    # a drift the tiny model surely notices (blur, the demo's, barely moves a detector this weak), and enough frames
    # for the drift test (50 at least: device_agent.drift.DriftConfig.min_samples)
    monkeypatch.setattr(Shapes, "drift", "all")
    monkeypatch.setattr(Shapes, "frames", 100)
    monkeypatch.setattr(Shapes, "field_frames", 120)
    out = tmp_path / "demo"
    shutil.copytree(det_run, out / "run")
    _quick_refresh(out / "run")
    _teacher_onnx(out / "run")
    summary = run_demo(DemoOptions(out=out, task="detect", reuse=True, targets=("onnx",), rate_hz=0, window_s=0.3,
                                   bench_seconds=0.2))
    assert summary["task"] == "detect" and summary["metric"] == MAP
    for name in ("summary.json", "summary.md", "bench/report.md", "routing_curve.png"):
        assert (out / name).is_file(), f"demo left no {name}"
    assert set(summary["bundles"]) == {"onnx-fp32", "onnx-int8"}
    devices = {d["device"]: d for d in summary["fleet"]["devices"]}
    assert set(devices) == {d for d, _, _ in FLEET}
    assert {d: r["bundle"] for d, r in devices.items()} == {"edge-1": "onnx-int8", "edge-2": "onnx-int8",
                                                             "edge-3": "onnx-int8"}
    for d in devices.values():
        assert d["inputs"] == 100 and 0.0 <= d["accuracy"] <= 1.0
        assert d["p50_ms"] is not None and d["p99_ms"] >= d["p50_ms"]
    assert devices["edge-1"]["stream"] == "clean camera" and devices["edge-3"]["stream"].startswith("drifted camera")
    assert devices["edge-1"]["accuracy"] > 0.0  # the clean camera's frames are found
    # the drifted camera is flagged, the clean ones are not, and it is visibly worse
    assert devices["edge-3"]["drift_flag"] is True
    assert devices["edge-1"]["drift_flag"] is False and devices["edge-2"]["drift_flag"] is False
    assert devices["edge-3"]["accuracy"] < devices["edge-1"]["accuracy"]
    md = (out / "summary.md").read_text()
    assert f"| {MAP} |" in md and "| edge-3 |" in md and "**DRIFT**" in md
    # the loop: the drifted camera's offloaded frames collected with the teacher's boxes, refreshed, rolled out
    loop = json.loads((out / "summary.json").read_text())["refresh"]
    assert loop["collected"][0]["device"] == "edge-3" and loop["collected"][0]["samples"] > 20
    assert 0.0 <= loop["before"]["student_accuracy"] <= 1.0 and 0.0 <= loop["teacher_accuracy_drifted"] <= 1.0
    if "refresh_error" in loop:  # the tiny teacher finds next to nothing on drifted scenes: its gate may refuse
        assert "held-out collected samples" in loop["refresh_error"], loop["refresh_error"]
        assert "refresh refused" in md
    else:  # the gain itself is checked at full size, in the slow test
        assert loop["after"]["inputs"] == 100 and 0.0 <= loop["after"]["accuracy"] <= 1.0
        assert 0.0 <= loop["after"]["student_accuracy"] <= 1.0
        assert loop["rollout"]["state"] in ("done", "rolled_back") and loop["rollout"]["steps"][0] == "started"
        assert f"| | {MAP} | device model alone |" in md
    assert loop["bad_rollout"]["state"] == "failed" and loop["bad_rollout"]["devices_on_it"] == []
    assert "## Closed loop (drifted device)" in md


@pytest.mark.slow
def test_detect_demo_command_end_to_end(tmp_path: Path) -> None:
    """What ``toolchain demo --task detect`` runs, from training on: every installed target, within its eight
    minutes, and the loop's gain on the drifted camera."""
    import os
    import resource

    _needs_mosquitto()
    out = tmp_path / "demo"
    load = os.getloadavg()[0]
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "toolchain.cli", "demo", "--task", "detect", "--out", str(out),
                        "--json"], capture_output=True, text=True, timeout=3600)
    seconds = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["metric"] == MAP
    for name in ("onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8", "tflite-fp32"):
        assert summary["bundles"][name]["verify"]["status"] == "passed", name
    # tflite int8: one int8 scale over box distances and logits; when its gate refuses it, it is said, not hidden
    failed = {f["bundle"]: f["error"] for f in summary["failed_builds"]}
    assert set(failed) <= {"tflite-int8"} and all("mAP@0.5:0.95" in e for e in failed.values()), failed
    devices = {d["device"]: d for d in summary["fleet"]["devices"]}
    assert devices["edge-3"]["drift_flag"] and not devices["edge-1"]["drift_flag"]
    assert devices["edge-3"]["accuracy"] < devices["edge-1"]["accuracy"]
    loop = summary["refresh"]
    assert "refresh_error" not in loop, loop.get("refresh_error")
    assert loop["bad_rollout"]["state"] == "failed" and loop["bad_rollout"]["devices_on_it"] == []
    before, after = loop["before"], loop["after"]
    goals = {
        "device model alone gains": after["student_accuracy"] > before["student_accuracy"],
        "canary promoted": loop["rollout"]["state"] == "done",
        # eight minutes of two cores at most; the wall clock itself only where the machine was not shared
        "fits eight minutes on two cores": cpu < 2 * 480 and (load > 2.5 or seconds < 480),
    }
    assert all(goals.values()), (f"detect demo: {goals}; before {before}, after {after}; {seconds:.0f} s wall, "
                                 f"{cpu:.0f} s CPU, load {load:.1f} at the start")
