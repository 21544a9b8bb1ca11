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
