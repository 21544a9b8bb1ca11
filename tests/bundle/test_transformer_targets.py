"""A transformer student (tiny_vit_run: heads pruned, distilled, QAT) built for every target, and what stayed float."""

from __future__ import annotations

import pytest

from edgecore.errors import TargetUnavailableError
from toolchain.bundle import build_bundle

# target, precision, an int8 op the artifact must report, a float op it must report (attention's softmax)
CASES = [
    ("onnx", "int8", "MatMulIntegerToFloat", "Softmax"),
    ("openvino", "int8", "FullyConnected", None),
    ("tflite", "int8", "FULLY_CONNECTED", "SOFTMAX"),
    ("coreml", "fp16", None, None),
    ("jetson", "int8", None, None),
]


@pytest.mark.parametrize("target, precision, int8_op, float_op", CASES, ids=[f"{t}-{p}" for t, p, _, _ in CASES])
def test_a_vit_student_builds_and_passes_its_gate(tiny_vit_run, tmp_path, target, precision, int8_op, float_op):
    try:
        rep = build_bundle(run_dir=tiny_vit_run, target=target, precision=precision, out=tmp_path / "b")
    except TargetUnavailableError as e:
        pytest.skip(str(e))
    assert rep["verify"]["status"] in ("passed", "proxy"), rep["verify"]
    m = rep["metrics"]
    acc = m.get("accuracy") if m.get("accuracy") is not None else m.get("proxy_accuracy")
    if acc is not None:
        assert acc >= m["reference_accuracy"] - 0.01 - 1e-9  # int8 within a point of the fp32 student
    details = rep["artifact"]
    ops = details.get("ort_graph") or details.get("runtime_precision") or details
    if int8_op:
        assert ops["int8_ops" if "int8_ops" in ops else "quantized_ops"].get(int8_op, 0) > 0, ops
    if float_op:
        assert ops["float_ops"].get(float_op, 0) > 0, ops
    if target == "tflite":  # a transformer's weights are quantized per output channel
        assert details["per_channel"] is True and "LayerNorm" in details["per_channel_reason"]
    if target == "openvino":
        assert any(k.startswith("MVN") for k in ops["float_ops"]), ops  # LayerNorm stays float
