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
    from device_agent.bundle import open_bundle
    from toolchain.bundle import build_bundle

    out = tmp_path / "bundles"
    rows = {}
    for target, precision in REQUIRED:
        rep = build_bundle(run_dir=default_run, target=target, precision=precision, out=out / f"{target}-{precision}")
        open_bundle(out / f"{target}-{precision}")
        rows[f"{target}-{precision}"] = {**rep["metrics"], "verify": rep["verify"]["status"],
                                         "method": rep["artifact"].get("method")}
    (out / "acceptance.json").write_text(json.dumps(rows, indent=2))
    for key, m in rows.items():
        target, precision = key.split("-")
        if m["verify"] == "skipped":
            assert target in ("coreml", "jetson")
            continue
        if precision == "fp32":
            assert m["agreement"] >= 0.995, key
        assert m["accuracy"] >= m["reference_accuracy"] - 0.01, key
