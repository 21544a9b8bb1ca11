from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgecore.errors import BenchError
from hw_bench.cli import main
from hw_bench.data import TestData, save_npz
from hw_bench.loadgen import Scenario, Settings
from hw_bench.local import run_local
from hw_bench.report import report
from hw_bench.results import read_run, write_run
from targets import load_runner

from .tinybundle import make_bundle

FAST = Settings(min_duration_s=0.2, min_queries=20, warmup=2)


def _torch_twin(bundle: Path, out: Path) -> Path:
    """The same network as the tiny ONNX bundle, in PyTorch, saved as hw-bench baselines are."""
    import onnx
    import torch
    from onnx import numpy_helper

    w = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(bundle / "model.onnx")).graph.initializer}
    lin1 = torch.nn.Linear(64, w["w1"].shape[1], bias=False)
    lin2 = torch.nn.Linear(w["w2"].shape[0], 10, bias=False)
    with torch.no_grad():
        lin1.weight.copy_(torch.from_numpy(np.ascontiguousarray(w["w1"].T)))
        lin2.weight.copy_(torch.from_numpy(np.ascontiguousarray(w["w2"].T)))
    module = torch.nn.Sequential(torch.nn.Flatten(), lin1, torch.nn.ReLU(), lin2).eval()
    torch.save({"module": module, "name": "tiny"}, out)
    return out


def test_local_run_with_pytorch_baseline_accuracy_and_report(tiny_bundle: Path, tmp_path: Path, tiny_data: TestData) -> None:
    from edgecore.bundle import open_bundle

    b = open_bundle(tiny_bundle)
    y = load_runner(b).run(b.input_spec.preprocess(tiny_data.X_raw)).argmax(1)
    y[:10] = (y[:10] + 3) % 10  # 30/40 right
    save_npz(tmp_path / "d.npz", TestData(tiny_data.X_raw, y, "d"))
    base = _torch_twin(tiny_bundle, tmp_path / "tiny.pt")
    other = make_bundle(tmp_path / "other", name="wide", in_shape=(20,), seed=3)
    run = run_local(bundles=[tiny_bundle, other], settings=FAST, threads=1, repetitions=2,
                    data=[tmp_path / "d.npz"], baselines=[str(base)], vendor_check=True)
    rows = {r["artifact"]: r for r in run["results"]}
    assert set(rows) == {"tiny pytorch/fp32", "tiny onnx/fp32", "wide onnx/fp32"}
    torch_row, ort_row, wide = rows["tiny pytorch/fp32"], rows["tiny onnx/fp32"], rows["wide onnx/fp32"]
    # same network, same data: the same accuracy, measured, not copied
    assert torch_row["accuracy"]["accuracy"] == pytest.approx(0.75)
    assert ort_row["accuracy"]["accuracy"] == pytest.approx(0.75)
    assert wide["accuracy"] is None  # no data of its shape
    assert torch_row["speedup_vs_pytorch"] == 1.0
    assert ort_row["speedup_vs_pytorch"] > 0 and len(ort_row["speedup_rounds"]) == 2
    assert wide["speedup_vs_pytorch"] is None
    assert ort_row["queries"] >= 20 and ort_row["duration_s"] >= 0.2
    assert run["env"]["threads"] == 1 and run["env"]["cpu"]["model"]
    assert "steal_pct" in run["env"]  # what the hypervisor took while it measured (None off Linux)
    assert any("trtexec" in n for n in run["notes"])

    path = write_run(tmp_path / "r.json", run)
    write_run(path, run, append=True)
    assert len(read_run(path)["results"]) == 6
    out = report([path], tmp_path / "rep")
    md = out["markdown"].read_text()
    assert "tiny onnx/fp32" in md and "speed-up vs PyTorch" in md and "0.7500" in md and "steal %" in md
    for png in ("latency_png", "pareto_png"):
        assert out[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_offline_run_reports_best_batch(tiny_bundle: Path) -> None:
    s = Settings(scenario=Scenario.OFFLINE, min_duration_s=0.2, min_queries=20, warmup=2, batch_sizes=(1, 8))
    run = run_local(bundles=[tiny_bundle], settings=s, repetitions=1, vendor_check=False)
    (row,) = run["results"]
    assert row["batch_size"] in (1, 8) and set(row["batch_search"]) == {"1", "8"}


def test_cli_run_and_report(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["run", str(tiny_bundle), "--duration", "0.1", "--min-queries", "10", "--repetitions", "1",
               "--threads", "1", "--out", str(tmp_path / "r.json")])
    assert rc == 0
    assert json.loads((tmp_path / "r.json").read_text())["schema_version"] == 1
    assert main(["report", str(tmp_path / "r.json"), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").exists()


def test_bad_inputs_give_one_line_errors(tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "missing"), "--out", str(tmp_path / "r.json")]) == 2
    assert "no such bundle" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"kind": "hw_bench.results", "schema_version": 99, "results": []}')
    assert main(["report", str(tmp_path / "bad.json"), "--out", str(tmp_path / "rep")]) == 2
    assert "schema 99" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(BenchError, match="no bundle has that model"):
        run_local(bundles=[tiny_bundle], settings=FAST, baselines=["nomodel=python:torch.nn:Identity"], vendor_check=False)


def test_baseline_factory_must_return_a_module(tiny_bundle: Path) -> None:
    with pytest.raises(BenchError, match="not a torch module"):
        run_local(bundles=[tiny_bundle], settings=FAST, baselines=["python:collections:OrderedDict"], vendor_check=False)


def test_run_with_a_trained_run_dir_gives_data_and_baseline(onnx_bundle: Path, tiny_run: Path, tmp_path: Path) -> None:
    """The contract path: a toolchain-built bundle + its run dir (test split, PyTorch student)."""
    run = run_local(bundles=[onnx_bundle], settings=FAST, threads=1, repetitions=1, run_dirs=[tiny_run],
                    vendor_check=False)
    rows = {r["kind"]: r for r in run["results"]}
    assert set(rows) == {"pytorch", "bundle"}
    b, t = rows["bundle"], rows["pytorch"]
    assert b["model"] == t["model"] and b["speedup_vs_pytorch"] > 0
    # the fp32 ONNX export and the PyTorch student agree on the test split
    assert b["accuracy"]["n"] == t["accuracy"]["n"] > 0
    assert abs(b["accuracy"]["accuracy"] - t["accuracy"]["accuracy"]) <= 1 / b["accuracy"]["n"] + 1e-9
