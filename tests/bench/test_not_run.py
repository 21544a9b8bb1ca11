"""Bundles whose runtime is absent: hw-bench runs the others and reports their build figures, proxies marked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from edgecore.errors import BenchError
from hw_bench.loadgen import Settings
from hw_bench.local import run_local
from hw_bench.report import report
from hw_bench.results import write_run


def test_jetson_bundle_is_reported_with_its_proxy_figure(bundle_factory: Callable[[str, str], Path], tmp_path: Path) -> None:
    jetson, onnx = bundle_factory("jetson", "int8"), bundle_factory("onnx", "fp32")
    run = run_local(bundles=[onnx, jetson], settings=Settings(min_duration_s=0.05, min_queries=20, warmup=2),
                    repetitions=1, vendor_check=False, accuracy=False)
    assert [r["target"] for r in run["results"]] == ["onnx"]
    (n,) = run["not_run"]
    assert n["target"] == "jetson" and "tensorrt" in n["reason"] and n["build_verify"] == "proxy"
    assert n["build_accuracy"] is None and n["proxy_accuracy"] > 0.5 and n["proxy_runtime"].startswith("onnxruntime")
    md = Path(report([write_run(tmp_path / "r.json", run)], tmp_path / "rep")["markdown"]).read_text()
    section = md.split("## Not run on this machine", 1)[1].split("##", 1)[0]
    assert f"{n['proxy_accuracy']:.4f} PROXY (onnxruntime" in section and "passed" not in section
    with pytest.raises(BenchError, match="no bundle here can run"):
        run_local(bundles=[jetson], settings=Settings(min_duration_s=0.05, min_queries=5, warmup=1), vendor_check=False)
