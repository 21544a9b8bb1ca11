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


def tiny_detect_onnx(path: Path, params: Any, *, seed: int = 0) -> None:
    """A raw detector output ``(N, A, 4 + C)`` for ``params`` (`DecodeParams`) from a (N, 3, H, W) input:
    Flatten -> Gemm -> Reshape, box distances through Abs (non-negative), class logits as they come."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    h, w = params.input_size
    f, a, k = 3 * h * w, params.num_anchors, params.channels
    wt = (rng.standard_normal((f, a * k)) * 2 / np.sqrt(f)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w"], ["y"]),
        helper.make_node("Reshape", ["y", "shape"], ["raw"]),
        helper.make_node("Split", ["raw", "split"], ["box", "cls"], axis=2),
        helper.make_node("Abs", ["box"], ["dist"]),
        helper.make_node("Concat", ["dist", "cls"], ["logits"], axis=2),
    ]
    graph = helper.make_graph(
        nodes, "tiny_detect",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", a, k])],
        initializer=[numpy_helper.from_array(wt, "w"), numpy_helper.from_array(np.array([-1, a, k], np.int64), "shape"),
                     numpy_helper.from_array(np.array([4, k - 4], np.int64), "split")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def make_detect_bundle(root: Path, *, name: str = "tinydet", size: int = 32, classes: int = 3, seed: int = 0) -> Path:
    """A detect bundle (schema 3, ``task: detect`` with its `DecodeParams`) of `tiny_detect_onnx`."""
    from edgecore.detect import DecodeParams

    params = DecodeParams(input_size=(size, size), strides=(8, 16, 32), num_classes=classes)
    root.mkdir(parents=True, exist_ok=True)
    tiny_detect_onnx(root / "model.onnx", params, seed=seed)
    spec = InputSpec(name="input", shape=(None, 3, size, size), layout="NCHW", scale=1 / 255)
    return _write_manifest(root, name=name, spec=spec, labels=[str(i) for i in range(classes)],
                           task={"name": "detect", "params": params.to_dict()})


def make_bundle(root: Path, *, name: str = "tiny", in_shape: tuple[int, ...] = (1, 8, 8), seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tiny_onnx(root / "model.onnx", in_shape=in_shape, seed=seed)
    spec = InputSpec(name="input", shape=(None, *in_shape), layout="NCHW" if len(in_shape) == 3 else "NF", scale=1 / 16)
    return _write_manifest(root, name=name, spec=spec, labels=[str(i) for i in range(10)],
                           task={"name": "classify", "params": {}})


def _write_manifest(root: Path, *, name: str, spec: InputSpec, labels: list[str], task: dict[str, Any]) -> Path:
    import onnxruntime

    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "task": task,
        "model": {"name": name, "version": "1"},
        "target": "onnx",
        "precision": "fp32",
        "toolchain_version": "test",
        "created": "2026-01-01T00:00:00Z",
        "input": spec.to_dict(),
        "output": {"name": "logits", "labels": labels},
        "artifact": {"main": "model.onnx", "runtime": "onnxruntime", "runtime_version": onnxruntime.__version__, "details": {}},
        "files": {k: e.to_dict() for k, e in file_entries(root, ["model.onnx"]).items()},
        "metrics": {"accuracy": None},
        "routing": {},
        "calibration": None,
        "lineage": {},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root
