"""Tiny real ONNX bundles for the bench tests (built with onnx.helper, no torch).

The shared `bundle_factory` fixture builds from a trained run and takes
longer; these let the runner, reports and fleet be tested in well under a
second each. Until ``targets.onnx_target`` exists, `ensure_onnx_target`
points the registry's "onnx" entry at `OrtTarget` below: a real ONNX Runtime
runner, the same calls the real target makes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.bundle import SCHEMA_VERSION, file_entries
from targets.base import InputSpec, Precision, Target


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
        "schema_version": SCHEMA_VERSION,
        "model": {"name": name, "version": "1"},
        "target": "onnx",
        "precision": "fp32",
        "toolchain_version": "test",
        "created": "2026-01-01T00:00:00Z",
        "input": spec.to_dict(),
        "output": {"name": "logits", "labels": [str(i) for i in range(10)]},
        "artifact": {"main": "model.onnx", "runtime": "onnxruntime", "runtime_version": onnxruntime.__version__, "details": {}},
        "files": file_entries(root, ["model.onnx"]),
        "metrics": {"accuracy": None},
        "routing": {},
        "calibration": None,
        "lineage": {},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


class OrtTarget(Target):
    name = "onnx"
    precisions = (Precision.FP32,)
    runtime = "onnxruntime"
    install_hint = "pip install onnxruntime"

    def available(self) -> tuple[bool, str]:
        return True, ""

    def build_available(self) -> tuple[bool, str]:
        return False, "test target: builds nothing"

    def build(self, source, precision, calibration, out_dir):  # type: ignore[no-untyped-def]
        raise NotImplementedError("test target builds nothing")

    def load(self, bundle_dir: Path, manifest: dict[str, Any], *, threads: int | None = None):  # type: ignore[no-untyped-def]
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(bundle_dir / manifest["artifact"]["main"]), so, providers=["CPUExecutionProvider"])

        class _R:
            def run(self, batch: np.ndarray) -> np.ndarray:
                return sess.run(None, {"input": batch})[0]

        return _R()


def ensure_onnx_target(monkeypatch: Any) -> None:
    """Use the real ``targets.onnx_target`` when it exists, else `OrtTarget`."""
    import importlib.util

    import targets

    if importlib.util.find_spec("targets.onnx_target") is None:
        monkeypatch.setitem(targets.BUILTIN, "onnx", "tests.bench.tinybundle:OrtTarget")
