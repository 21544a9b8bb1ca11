"""Acceptance numbers on the default-config digits student (slow: trains the full pipeline once).

``EDGE_ACCEPTANCE_RUN=/path/to/run`` reuses a finished default-config run instead of training.
Writes ``acceptance.json`` beside the bundles with every number of the issue note.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REQUIRED = [("onnx", "fp32"), ("onnx", "int8"), ("openvino", "fp32"), ("openvino", "fp16"), ("openvino", "int8"),
            ("tflite", "fp32"), ("tflite", "int8"), ("coreml", "fp16"), ("coreml", "int8"), ("jetson", "fp16"),
            ("jetson", "int8")]


@pytest.fixture(scope="module")
def default_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("EDGE_ACCEPTANCE_RUN")
    if env:
        return Path(env)
    from toolchain import pipeline
    from toolchain.config import Config

    run_dir = tmp_path_factory.mktemp("acceptance") / "run"
    pipeline.run_all(Config(), run_dir, show=False)
    return run_dir


@pytest.mark.slow
def test_default_student_all_targets(default_run: Path, tmp_path: Path) -> None:
    from edgecore.bundle import open_bundle
    from toolchain.bundle import build_bundle

    out = tmp_path / "bundles"
    rows = {}
    for target, precision in REQUIRED:
        rep = build_bundle(run_dir=default_run, target=target, precision=precision, out=out / f"{target}-{precision}")
        open_bundle(out / f"{target}-{precision}")
        rows[f"{target}-{precision}"] = {**rep["metrics"], "verify": rep["verify"]["status"],
                                         "method": rep["artifact"].get("method")}
    sizes = {k: v["size_bytes"] for k, v in rows.items()}
    ratios = {t: sizes[f"{t}-fp32"] / sizes[f"{t}-int8"] for t in ("onnx", "openvino", "tflite") }
    ov = open_bundle(out / "openvino-fp32").manifest.files["model.bin"].size / \
        open_bundle(out / "openvino-int8").manifest.files["model.bin"].size
    (out / "acceptance.json").write_text(json.dumps({"bundles": rows, "int8_size_ratio": ratios,
                                                     "openvino_bin_ratio": ov}, indent=2))
    print(json.dumps({"int8_size_ratio": ratios, "openvino_bin_ratio": ov}))
    # ONNX: >= 3x. OpenVINO: the .xml graph text (~110 KB here) does not shrink with int8, so the weights
    # file is what must: >= 3x. LiteRT: per-channel scales and int64 zero points per output channel cost
    # ~30 KB, so weights are per tensor by default (3.25x measured; per channel: 2.98x).
    assert ratios["onnx"] >= 3.0 and ov >= 3.0 and ratios["tflite"] >= 3.0, (ratios, ov)
    for key, m in rows.items():
        target, precision = key.split("-")
        if m["verify"] == "proxy":  # runtime absent here: the proxy figure is gated like the real one
            assert target in ("coreml", "jetson")
            assert m["proxy_accuracy"] >= m["reference_accuracy"] - 0.01, key
            continue
        if precision == "fp32":
            assert m["agreement"] >= 0.995, key
        assert m["accuracy"] >= m["reference_accuracy"] - 0.01, key
