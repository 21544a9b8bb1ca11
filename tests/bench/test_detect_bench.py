"""Detection bundles in the bench: the runtime call and the task's decode + NMS timed apart per frame, and the
benchmark models' detector."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from edgecore.detect import Detections
from edgecore.tasks import get_task
from edgecore.timing import timed_frames
from hw_bench.bench import task_post_step
from hw_bench.loadgen import PostStep, Scenario, Settings, single_stream
from hw_bench.local import run_local
from hw_bench.report import report
from hw_bench.results import write_run
from hw_bench.tables import print_rows

from .tinybundle import make_bundle, make_detect_bundle

FAST = Settings(min_duration_s=0.2, min_queries=20, warmup=2)


def test_the_task_says_whether_a_frame_has_a_step_after_the_runtime() -> None:
    assert get_task("classify").postprocess_label is None and task_post_step({"name": "classify"}) is None
    det = get_task({"name": "detect", "params": {"input_size": [32, 32], "strides": [8, 16, 32], "num_classes": 3}})
    step = task_post_step(det.spec)
    assert step is not None and step.name == "decode+NMS"
    (d,) = step.fn(np.zeros((1, 21, 7), np.float32))  # logits 0: every score 0.5, all 63 pairs candidates
    assert isinstance(d, Detections) and 0 < len(d) <= 63


def test_timed_frames_times_the_post_step_on_each_query_s_own_output() -> None:
    seen: list[np.ndarray] = []

    def run(batch: np.ndarray) -> np.ndarray:
        return batch * 2

    def post(out: np.ndarray) -> None:
        seen.append(out)
        t = __import__("time").perf_counter()
        while __import__("time").perf_counter() - t < 0.002:
            pass

    batches = [np.full((1, 1), i, np.float32) for i in range(3)]
    lat, post_ms, dur = timed_frames(run, post, batches, min_s=0.0, min_q=6, max_s=5.0, warmup=1)
    assert len(lat) == len(post_ms) == 6 and len(seen) == 7  # warm-up included
    assert [float(o[0, 0]) for o in seen[1:]] == [0.0, 2.0, 4.0, 0.0, 2.0, 4.0]
    assert post_ms.min() >= 2.0 and lat.max() < 2.0  # the runtime's time leaves the post step out
    r = single_stream(run, np.zeros((3, 1), np.float32), Settings(min_duration_s=0.0, min_queries=5, warmup=0),
                      PostStep("wait", post))
    assert r.duration_s < 0.01  # the post step's time is not the runtime's: throughput stays the runtime's
    assert 0.5 < (r.post_share() or 0) < 1


def test_a_detect_bundle_timed_locally_has_a_decode_column(tmp_path: Path) -> None:
    det = make_detect_bundle(tmp_path / "det")
    cls = make_bundle(tmp_path / "cls")
    run = run_local(bundles=[det, cls], settings=FAST, threads=1, repetitions=2, accuracy=False, vendor_check=False)
    rows = {r["artifact"]: r for r in run["results"]}
    d, c = rows["tinydet onnx/fp32"], rows["tiny onnx/fp32"]
    assert "postprocess" not in c  # a classifier's logits are its answer: nothing after the runtime
    p = d["postprocess"]
    assert p["name"] == "decode+NMS"
    assert all(math.isfinite(v) and v > 0 for v in p["latency_ms"].values())
    assert 0 < p["share"] < 1 and len(p["share_rounds"]) == 2
    assert p["frame_ms"]["p50"] >= d["latency_ms"]["p50"] and len(p["frame_latencies_ms"]) == d["queries"]
    assert p["share"] == pytest.approx(p["latency_ms"]["p50"] / p["frame_ms"]["p50"], rel=0.5)

    out = report([write_run(tmp_path / "r.json", run)], tmp_path / "rep")
    md = out["markdown"].read_text()
    assert "decode+NMS p50 ms (share of frame)" in md
    line = next(x for x in md.splitlines() if x.startswith("| tinydet onnx/fp32"))
    assert f"({100 * p['share']:.1f}%)" in line
    assert next(x for x in md.splitlines() if x.startswith("| tiny onnx/fp32")).count("| – |") >= 1
    assert out["latency_png"].read_bytes()[:4] == b"\x89PNG"


def test_the_terminal_table_and_offline_runs_carry_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    det = make_detect_bundle(tmp_path / "det")
    s = Settings(scenario=Scenario.OFFLINE, min_duration_s=0.2, min_queries=20, warmup=2, batch_sizes=(1, 4))
    run = run_local(bundles=[det], settings=s, repetitions=1, accuracy=False, vendor_check=False)
    (row,) = run["results"]
    assert row["postprocess"]["latency_ms"]["p50"] > 0 and 0 < row["postprocess"]["share"] < 1
    print_rows(run)
    assert "decode+NMS" in capsys.readouterr().out


def test_accuracy_mode_asks_the_task_a_detector_s_quality(tmp_path: Path) -> None:
    """Each image's AP at IoU 0.5 (`Task.quality`), not the argmax of a flattened box tensor."""
    from edgecore.bundle import open_bundle
    from hw_bench.data import TestData, load_npz, save_npz
    from targets import load_runner

    det = make_detect_bundle(tmp_path / "det")
    b = open_bundle(det)
    X = np.random.default_rng(2).uniform(0, 255, (8, 3, 32, 32)).astype(np.float32)
    found = get_task(b.manifest.task).postprocess(load_runner(b).run(b.input_spec.preprocess(X)))
    k = max(len(d) for d in found)
    y = np.full((8, k, 5), -1.0, np.float32)
    for i, d in enumerate(found):
        y[i, : len(d), 0], y[i, : len(d), 1:] = d.classes, d.boxes
    y[4:, :, 1:] += 100.0  # half the images' objects elsewhere: those images score 0
    assert all(len(d) for d in found[4:])
    save_npz(tmp_path / "d.npz", TestData(X, y, "d"))
    assert load_npz(tmp_path / "d.npz").y.dtype == np.float32  # boxes stay boxes
    run = run_local(bundles=[det], settings=FAST, threads=1, repetitions=1, data=[tmp_path / "d.npz"],
                    vendor_check=False)
    assert run["results"][0]["accuracy"] == {"accuracy": pytest.approx(0.5), "n": 8, "source": str(tmp_path / "d.npz")}


def test_a_fleet_job_on_a_detect_bundle_reports_the_decode_too(tmp_path: Path) -> None:
    from edgecore.bundle import open_bundle
    from hw_bench.job import run_job

    out = run_job({"job_id": "j", "duration_s": 0.1, "min_queries": 10, "warmup": 1, "accuracy": False},
                  open_bundle(make_detect_bundle(tmp_path / "det")))
    (row,) = out["results"]
    assert row["postprocess"]["name"] == "decode+NMS" and row["postprocess"]["latency_ms"]["p50"] > 0


def test_the_benchmark_models_include_a_320_detector(tmp_path: Path) -> None:
    from edgecore.bundle import open_bundle
    from hw_bench.cli import build_parser
    from hw_bench.models import DETECTOR_CANDIDATES, DETECTOR_SIZE, bench_model_names, build_bench_models

    assert "detector" in bench_model_names() and DETECTOR_SIZE == 320
    assert "detector" in build_parser().parse_args(["models", "--out", "x"]).families.split(",")
    out = build_bench_models(out_dir=tmp_path / "m", families=["detector"], targets=["onnx"], precisions=["fp32"],
                             size=64)
    (bdir,) = out["bundles"]
    b = open_bundle(bdir)
    assert b.manifest.task.name == "detect" and b.manifest.task.params["input_size"] == [64, 64]
    m = b.manifest.metrics
    assert m["max_abs_logit_diff"] < 1e-3  # fp32 ONNX == PyTorch
    # a random head would decode nothing (1% everywhere) or everything: its bias is set for a trained count
    assert m["decode_candidates_per_image"] == pytest.approx(DETECTOR_CANDIDATES, rel=0.25)
    assert 1 <= m["decode_kept_per_image"] <= 100
    run = run_local(bundles=[bdir], settings=FAST, threads=1, repetitions=1, accuracy=False, vendor_check=False)
    assert run["results"][0]["postprocess"]["latency_ms"]["p50"] > 0
