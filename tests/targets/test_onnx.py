from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from targets import Precision, get_target
from tests.targets.contract import TargetContract


class TestOnnxContract(TargetContract):
    target_name = "onnx"


class TestOnnxFromQdqContract(TargetContract):
    """int8 from the QAT student's QDQ graph (copied and cleaned, not re-quantized)."""

    target_name = "onnx"
    use_qdq_source = True


def test_int8_ptq_is_qdq_with_int8_weights(tiny_source: Any, tmp_path) -> None:
    art = get_target("onnx").build(tiny_source.source, Precision.INT8, tiny_source.rep, tmp_path)
    assert art.details["method"] == "ort-static-ptq-qdq"
    m = onnx.load(str(tmp_path / art.main))
    ops = {n.op_type for n in m.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8 = [i for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1]
    assert int8, "weights are not stored as int8"
    # reduce_range: 7-bit weights for non-VNNI CPUs
    w = max(int(np.abs(onnx.numpy_helper.to_array(i)).max()) for i in int8)
    assert w <= 64


def test_cleanup_strips_debug_metadata(tiny_source: Any, tmp_path) -> None:
    art = get_target("onnx").build(tiny_source.source, Precision.FP32, None, tmp_path)
    m = onnx.load(str(tmp_path / art.main))
    assert not any(n.metadata_props for n in m.graph.node)
    assert len(m.graph.value_info) == 0


def _ort_logits(path, x: np.ndarray, *, optimize: bool = True) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_int8_ptq_runs_every_conv_gemm_add_quantized_with_uint8_activations(tiny_source: Any, tmp_path) -> None:
    from targets._qdq import ort_fusion

    art = get_target("onnx").build(tiny_source.source, Precision.INT8, tiny_source.rep, tmp_path)
    scheme = art.details["scheme"]
    assert scheme == {"activation_dtype": "uint8", "activation_symmetric": False, "weight_dtype": "int8",
                      "per_channel_weights": True}
    graph = ort_fusion(tmp_path / art.main)  # ORT's own optimized graph, measured again here
    assert graph == art.details["ort_graph"]
    assert graph["float_compute"] == {}, f"compute left in float between Q/DQ: {graph}"
    assert graph["quantized_ops"]["QLinearConv"] == 2 and graph["quantized_ops"]["QGemm"] == 1
    # accuracy inside the build gate (1 point by default) on the held-out split
    acc = float((_ort_logits(tmp_path / art.main, tiny_source.x_test).argmax(1) == tiny_source.y_test).mean())
    ref = float((tiny_source.ref_logits.argmax(1) == tiny_source.y_test).mean())
    assert acc >= ref - 0.01, (acc, ref)


def test_int8_activations_rewritten_to_uint8_exactly(tiny_source: Any, tmp_path) -> None:
    """A QDQ source with signed int8 activations is rewritten to uint8 (zero point + 128), same numbers."""
    import dataclasses

    from targets._qdq import qdq_scheme
    from targets.onnx_target import static_quantize_onnx

    s8 = tmp_path / "s8.onnx"
    static_quantize_onnx(tiny_source.source.onnx_fp32, s8, tiny_source.rep, symmetric_activations=True)
    assert qdq_scheme(onnx.load(str(s8)))["activation_dtype"] == "int8"
    src = dataclasses.replace(tiny_source.source, onnx_qdq=s8, qdq_weight_bits=7)
    out = tmp_path / "out"
    out.mkdir()
    art = get_target("onnx").build(src, Precision.INT8, None, out)
    assert art.details["method"] == "qat-qdq" and art.details["uint8_rewrite_nodes"] > 0
    assert art.details["scheme"]["activation_dtype"] == "uint8"
    assert art.details["ort_graph"]["float_compute"] == {}
    x = tiny_source.x_test[:64]
    np.testing.assert_array_equal(_ort_logits(s8, x, optimize=False), _ort_logits(out / art.main, x, optimize=False))
