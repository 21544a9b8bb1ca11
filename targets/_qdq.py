"""QDQ ONNX graphs for CPU runtimes: the quantization scheme, the int8 -> uint8 rewrite, ORT's fused graph.

ONNX Runtime's CPU kernels (QLinearConv, QLinearAdd, QGemm) are built for
uint8 activations with int8 weights; with signed int8 activations its
optimizer leaves convolutions and adds in fp32 between Q/DQ pairs and int8
runs slower than fp32. `activations_to_uint8` rewrites every activation
Q/DQ pair from int8 to uint8 with the zero point moved by +128: q_u8 = q_s8 +
128 for every value, so the graph computes exactly the same numbers.
`ort_fusion` runs ORT's optimizer (``SessionOptions.optimized_model_filepath``)
and counts what is left in float.
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["activations_to_uint8", "qdq_scheme", "ort_fusion", "FLOAT_COMPUTE_OPS"]

#: ops that, left in ORT's optimized graph, are compute running in float
FLOAT_COMPUTE_OPS = ("Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "Add", "ConvTranspose")
_QOPS = ("QuantizeLinear", "DequantizeLinear")


def _inits(model: Any) -> dict[str, Any]:
    return {i.name: i for i in model.graph.initializer}


def activations_to_uint8(model: Any) -> int:
    """Rewrite int8 activation Q/DQ pairs of ``model`` (onnx.ModelProto) to uint8 in place; returns how many nodes.

    Weight DequantizeLinear nodes (input is an initializer) keep int8. Every
    consumer of a rewritten Q's output is a DequantizeLinear (checked first;
    otherwise the graph is left as it is and 0 returned).
    """
    import numpy as np
    from onnx import TensorProto, numpy_helper

    g = model.graph
    inits = _inits(model)
    consumers: dict[str, list[Any]] = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    qs = [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits and len(n.input) > 2
          and n.input[2] in inits and inits[n.input[2]].data_type == TensorProto.INT8]
    if any(c.op_type != "DequantizeLinear" for q in qs for c in consumers[q.output[0]]):
        return 0
    made: dict[str, str] = {}

    def as_uint8(name: str) -> str:
        if name not in made:
            zp = numpy_helper.to_array(inits[name]).astype(np.int16) + 128
            new = numpy_helper.from_array(zp.astype(np.uint8), name=f"{name}_u8")
            g.initializer.append(new)
            made[name] = new.name
        return made[name]

    count = 0
    for q in qs:
        q.input[2] = as_uint8(q.input[2])
        count += 1
        for dq in consumers[q.output[0]]:
            dq.input[2] = as_uint8(dq.input[2])
            count += 1
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name in made and i.name not in used]:
        g.initializer.remove(init)
    return count


def qdq_scheme(model: Any) -> dict[str, Any]:
    """What the manifest records: activation dtype and symmetry, weight dtype, per-channel weights."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    inits = _inits(model)
    act_dtypes: set[str] = set()
    act_zero: set[bool] = set()
    w_dtypes: set[str] = set()
    per_channel = False
    for n in model.graph.node:
        if n.op_type not in _QOPS or len(n.input) < 3 or n.input[2] not in inits:
            continue
        zp = inits[n.input[2]]
        dtype = TensorProto.DataType.Name(zp.data_type).lower()
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:  # a weight (int32: a bias)
            if dtype == "int32":
                continue
            w_dtypes.add(dtype)
            per_channel = per_channel or numpy_helper.to_array(inits[n.input[1]]).size > 1
        elif n.op_type == "QuantizeLinear":
            act_dtypes.add(dtype)
            z = numpy_helper.to_array(zp).astype(np.int32)
            act_zero.add(bool(np.all(z == (128 if dtype == "uint8" else 0))))
    return {
        "activation_dtype": "/".join(sorted(act_dtypes)) or None,
        "activation_symmetric": bool(act_zero) and all(act_zero),
        "weight_dtype": "/".join(sorted(w_dtypes)) or None,
        "per_channel_weights": per_channel,
    }


def ort_fusion(path: Path) -> dict[str, Any]:
    """Node counts of ORT's optimized CPU graph of ``path``: Q/DQ left, compute left in float, quantized ops."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="ortopt.") as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return {
        "qdq_nodes": sum(ops[o] for o in _QOPS),
        "float_compute": {o: ops[o] for o in FLOAT_COMPUTE_OPS if ops[o]},
        "quantized_ops": {o: c for o, c in sorted(ops.items()) if o.startswith("QLinear") or o == "QGemm"},
    }
