from __future__ import annotations

from pathlib import Path

import pytest

from edgecore.bundle import open_bundle
from edgecore.errors import BenchError
from hw_bench.data import TestData, save_npz
from hw_bench.job import run_job
from targets import load_runner


def _job(**kw):  # type: ignore[no-untyped-def]
    job = {"schema": 1, "cmd": "bench", "job_id": "j1", "bundle_url": None, "bundle_path": None,
           "scenario": "single-stream", "duration_s": 0.2, "min_queries": 30, "warmup": 3, "threads": 1, "accuracy": True}
    job.update(kw)
    return job


def test_run_job_single_stream_reports_latency_env_and_skipped_accuracy(tiny_bundle: Path) -> None:
    b = open_bundle(tiny_bundle)
    out = run_job(_job(), b)
    assert out["schema_version"] == 1 and out["job_id"] == "j1"
    (row,) = out["results"]
    assert row["queries"] >= 30 and row["duration_s"] >= 0.2
    assert row["target"] == "onnx" and row["precision"] == "fp32"
    assert row["bundle_sha256"] == b.manifest_sha256
    assert row["threads"] == 1 and out["env"]["threads"] == 1
    assert out["env"]["cpu"]["logical_cores"] >= 1 and out["env"]["hostname"]
    assert set(row["latency_ms"]) >= {"p50", "p90", "p95", "p99"}
    assert row["accuracy"] is None and "no test data" in out["notes"][0]


def test_run_job_accuracy_from_npz(tiny_bundle: Path, tmp_path: Path, tiny_data: TestData) -> None:
    b = open_bundle(tiny_bundle)
    runner = load_runner(b, threads=1)
    pred = runner.run(b.input_spec.preprocess(tiny_data.X_raw)).argmax(1)
    y = pred.copy()
    y[::2] = (y[::2] + 1) % 10  # half wrong, on purpose
    save_npz(tmp_path / "t.npz", TestData(tiny_data.X_raw, y, "x"))
    out = run_job(_job(scenario="offline", data=str(tmp_path / "t.npz"), batch_sizes=[1, 8]), b)
    (row,) = out["results"]
    assert row["accuracy"]["accuracy"] == pytest.approx(0.5)
    assert row["accuracy"]["n"] == 40
    assert row["scenario"] == "offline" and row["batch_size"] in (1, 8)


@pytest.mark.parametrize(
    "bad, msg",
    [({"scenario": "server"}, "unknown scenario"), ({"duration_s": "2"}, "duration_s"),
     ({"threads": 0}, "threads"), ({"schema": 9}, "schema"), ({"data": "/nope.npz"}, "no such file")],
)
def test_run_job_refuses_bad_jobs(tiny_bundle: Path, bad: dict, msg: str) -> None:
    with pytest.raises(BenchError, match=msg):
        run_job(_job(**bad), open_bundle(tiny_bundle))
