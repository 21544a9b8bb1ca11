"""Tiny real ONNX bundles for the bench tests (built with onnx.helper, no torch).

A trained run takes longer to build; these let the runner, reports and
fleet be tested in well under a second each. They run through the real
``onnx`` target (`targets.onnx_target`), as every bundle does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgecore.bundle import SCHEMA_VERSION, file_entries
from edgecore.spec import InputSpec


def tiny_onnx(path: Path, *, in_shape: tuple[int, ...] = (1, 8, 8), classes: int = 10, seed: int = 0, hidden: int = 32) -> np.ndarray:
    """Flatten -> Gemm -> Relu -> Gemm, dynamic batch; returns W1 for reference."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    f = int(np.prod(in_shape))
    w1 = (rng.standard_normal((f, hidden)) / np.sqrt(f)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, classes)) / np.sqrt(hidden)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "w2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *in_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return w1


def make_bundle(root: Path, *, name: str = "tiny", in_shape: tuple[int, ...] = (1, 8, 8), seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tiny_onnx(root / "model.onnx", in_shape=in_shape, seed=seed)
    spec = InputSpec(name="input", shape=(None, *in_shape), layout="NCHW" if len(in_shape) == 3 else "NF", scale=1 / 16)
    import onnxruntime

    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "task": {"name": "classify", "params": {}},
        "model": {"name": name, "version": "1"},
        "target": "onnx",
        "precision": "fp32",
        "toolchain_version": "test",
        "created": "2026-01-01T00:00:00Z",
        "input": spec.to_dict(),
        "output": {"name": "logits", "labels": [str(i) for i in range(10)]},
        "artifact": {"main": "model.onnx", "runtime": "onnxruntime", "runtime_version": onnxruntime.__version__, "details": {}},
        "files": {k: e.to_dict() for k, e in file_entries(root, ["model.onnx"]).items()},
        "metrics": {"accuracy": None},
        "routing": {},
        "calibration": None,
        "lineage": {},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root
