"""The jetson proxy: the bundle's own ONNX graph on ONNX Runtime (CPU), where TensorRT is absent.

What TensorRT will run is the bundle's ``model.onnx`` under the recipe's
precision flags. The proxy evaluates that exact graph with ONNX Runtime's
graph optimizations off (the Q/DQ nodes are executed as the ONNX spec writes
them: the int8 rounding and clipping of every quantized weight and
activation), and models the recipe's ``FP16`` flag by rounding every float
activation through float16 (and, for the fp16 recipe, every float weight).
What only the engine can tell: TensorRT's layer fusions, its kernels'
accumulation order and precision, TF32 on Ampere and later GPUs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgecore.spec import Precision

from ..base import Proxy

FP16_SUFFIX = "__fp16"


def _float_tensors(model: Any) -> set[str]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    g = inferred.graph
    return {v.name for v in [*g.value_info, *g.input, *g.output] if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}


def round_through_fp16(model: Any, *, weights: bool) -> Any:
    """A copy of ``model`` in which every float activation passes through float16 (Cast pairs).

    The graph input is rounded too (the engine's first layer reads it in
    fp16); dequantized int8 weights are not (TensorRT keeps them int8 with
    fp32 scales). ``weights=True`` also rounds the float initializers.
    """
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    floats = _float_tensors(m)
    inits = {i.name for i in g.initializer}
    if weights:
        for init in g.initializer:
            if init.data_type == onnx.TensorProto.FLOAT:
                a = numpy_helper.to_array(init)
                init.CopyFrom(numpy_helper.from_array(a.astype("float16").astype("float32"), init.name))
    weight_dq = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}

    def casts(src: str, dst: str) -> list[Any]:
        mid = dst + FP16_SUFFIX
        return [helper.make_node("Cast", [src], [mid], to=onnx.TensorProto.FLOAT16, name=mid),
                helper.make_node("Cast", [mid], [dst], to=onnx.TensorProto.FLOAT, name=dst + "__fp32")]

    nodes: list[Any] = []
    renamed: dict[str, str] = {}
    for i in g.input:
        if i.name not in inits and i.name in floats:
            renamed[i.name] = i.name + "__rounded"
            nodes += casts(i.name, renamed[i.name])
    for n in g.node:
        for k, name in enumerate(n.input):
            if name in renamed:
                n.input[k] = renamed[name]
        after = []
        for k, name in enumerate(n.output):
            if name in floats and name not in weight_dq:
                n.output[k] = name + "__exact"  # the producer writes the exact value; the casts give the old name
                after += casts(n.output[k], name)
        nodes += [n, *after]
    del g.node[:]
    g.node.extend(nodes)
    return m


def jetson_proxy(onnx_path: Path, precision: Precision, *, threads: int | None = None) -> Proxy:
    """The proxy runner of a jetson bundle's graph for the recipe's ``precision``."""
    import onnx
    import onnxruntime as ort

    from .._ort import OrtRunner

    model = onnx.load(str(onnx_path))
    if precision is not Precision.FP32:
        model = round_through_fp16(model, weights=precision is Precision.FP16)
    evaluates = {
        Precision.INT8: "the bundle's QDQ graph as written (int8 weights and activations, symmetric), "
                        "float activations rounded through fp16 (recipe flags INT8+FP16)",
        Precision.FP16: "the bundle's graph with every weight and activation rounded through fp16 (recipe flag FP16)",
        Precision.FP32: "the bundle's fp32 graph as written",
    }[precision]
    return Proxy(
        runner=OrtRunner(model.SerializeToString(), threads=threads, optimize=False),
        runtime=f"onnxruntime {ort.__version__} CPUExecutionProvider (graph optimizations off)",
        evaluates=evaluates,
        not_modelled="TensorRT's layer fusions and kernel accumulation (and TF32 on Ampere+); the GPU itself",
    )
