"""The demo summary marks proxy figures as proxies and never says "passed" for them."""

from __future__ import annotations

from edge_demo.story import not_run_reasons, summary_markdown


def _bundle(verify: dict, **metrics: float | None) -> dict:
    base = {"size_bytes": 2048, "accuracy": None, "agreement": None, "reference_accuracy": 0.97}
    return {"metrics": {**base, **metrics}, "verify": verify}


def test_summary_marks_proxy_accuracy() -> None:
    proxy = {"status": "proxy", "runtime": "onnxruntime 1.32.0 CPUExecutionProvider (graph optimizations off)",
             "reason": "tensorrt is not installed"}
    summary = {
        "seconds": 1, "fleet": {"devices": []}, "skipped_targets": [], "failed_builds": [],
        "bundles": {
            "onnx-int8": _bundle({"status": "passed"}, accuracy=0.96, agreement=0.99),
            "jetson-int8": _bundle(proxy, proxy_accuracy=0.955, proxy_agreement=0.98, proxy_runtime=proxy["runtime"]),
        },
    }
    md = summary_markdown(summary)
    jet = next(line for line in md.splitlines() if line.startswith("| jetson-int8"))
    assert "95.5% (proxy)" in jet and "98.0% (proxy)" in jet and "PROXY (onnxruntime 1.32.0)" in jet
    assert "passed" not in jet
    onnx = next(line for line in md.splitlines() if line.startswith("| onnx-int8"))
    assert "96.0% |" in onnx and "(proxy)" not in onnx and "| passed |" in onnx
    assert "PROXY: onnxruntime" in not_run_reasons(summary)["jetson"]
