"""The TensorRT build recipe and the checks TensorRT's ONNX parser would make.

Everything here runs without TensorRT: the recipe (precision flags, workspace,
optimisation-profile shapes), the equivalent ``trtexec`` command line, and a
static check of the ONNX graph for TensorRT (opset range, operators the
ONNX-TensorRT parser supports, int8 QDQ placement and symmetric zero points).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from edgecore.errors import BuildError

from ..base import InputSpec, Precision

RECIPE_SCHEMA = 1
MIN_OPSET, MAX_OPSET = 9, 20  # opsets the TensorRT 10 ONNX parser accepts for these ops
WORKSPACE_MIB = 256

# Operators of the ONNX-TensorRT parser (TensorRT 10 "operators.md") that
# classification students use; anything outside this list is reported.
SUPPORTED_OPS = frozenset(
    """Abs Add AveragePool BatchNormalization Cast Ceil Clip Concat Constant ConstantOfShape Conv ConvTranspose
    Cos DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand Flatten Floor Gather GatherElements
    Gemm GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual HardSigmoid HardSwish Identity InstanceNormalization
    LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax MatMul Max MaxPool Mean Min Mod Mul Neg Not Pad
    Pow PRelu QuantizeLinear Range Reciprocal ReduceL2 ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum Relu
    Reshape Resize Selu Shape Sigmoid Sign Sin Slice Softmax Softplus Split Sqrt Squeeze Sub Sum Tanh Tile TopK
    Transpose Unsqueeze Where""".split()
)
COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def profile_shapes(spec: InputSpec, *, max_batch: int) -> dict[str, list[int]]:
    sample = list(spec.sample_shape)
    opt = max(1, min(8, max_batch))
    return {"min": [1, *sample], "opt": [opt, *sample], "max": [max_batch, *sample]}


def make_recipe(
    *, onnx_file: str, precision: Precision, spec: InputSpec, max_batch: int = 32, workspace_mib: int = WORKSPACE_MIB
) -> dict[str, Any]:
    """The recipe the device's engine builder follows (also written into the bundle)."""
    flags: list[str] = []
    if precision is Precision.FP16:
        flags = ["FP16"]
    elif precision is Precision.INT8:
        # explicit quantization: INT8 for the Q/DQ-wrapped layers, FP16 for the rest
        flags = ["INT8", "FP16"]
    recipe: dict[str, Any] = {
        "schema": RECIPE_SCHEMA,
        "onnx": onnx_file,
        "precision": precision.value,
        "quantization": "explicit-qdq" if precision is Precision.INT8 else None,
        "builder_flags": flags,
        "workspace_mib": workspace_mib,
        "input": spec.name,
        "profile": profile_shapes(spec, max_batch=max_batch),
    }
    recipe["trtexec"] = trtexec_command(recipe)
    return recipe


def trtexec_command(recipe: dict[str, Any], *, engine: str = "model.engine") -> str:
    """The ``trtexec`` line that builds the same engine by hand."""
    name = recipe["input"]
    shp = {k: "x".join(str(d) for d in v) for k, v in recipe["profile"].items()}
    args = [
        "trtexec",
        f"--onnx={recipe['onnx']}",
        f"--saveEngine={engine}",
        f"--minShapes={name}:{shp['min']}",
        f"--optShapes={name}:{shp['opt']}",
        f"--maxShapes={name}:{shp['max']}",
        f"--memPoolSize=workspace:{recipe['workspace_mib']}M",
    ]
    args += [f"--{f.lower()}" for f in recipe["builder_flags"]]
    return " ".join(shlex.quote(a) for a in args)


def check_onnx_for_tensorrt(path: Path, *, precision: Precision) -> dict[str, Any]:
    """Static TensorRT compatibility check of an ONNX graph; raises `BuildError` listing every problem."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:
        raise BuildError(f"{path}: invalid ONNX ({e})") from e
    problems: list[str] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        problems.append(f"opset {opset} outside TensorRT's supported {MIN_OPSET}..{MAX_OPSET}")
    g = model.graph
    unsupported = sorted({n.op_type for n in g.node if n.domain not in ("", "ai.onnx") or n.op_type not in SUPPORTED_OPS})
    if unsupported:
        problems.append(f"operators TensorRT's ONNX parser does not support: {', '.join(unsupported)}")
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    q_nodes = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    compute = [n for n in g.node if n.op_type in COMPUTE_OPS]
    quantized = 0
    if precision is Precision.INT8:
        if not q_nodes:
            problems.append("int8 needs an explicitly quantized (QDQ) graph, but it has no Q/DQ nodes")
        for n in q_nodes:
            if len(n.input) > 2 and n.input[2] in inits:
                zp = numpy_helper.to_array(inits[n.input[2]])
                if zp.dtype.kind == "u" or (zp != 0).any():
                    problems.append(f"{n.op_type} {n.name or n.output[0]}: TensorRT needs symmetric int8 (zero point 0, signed)")
                    break
        for n in compute:
            srcs = [producer.get(i) for i in n.input[:2]]
            if all(s is not None and s.op_type == "DequantizeLinear" for s in srcs):
                quantized += 1
        if q_nodes and quantized == 0:
            problems.append("no Conv/Gemm/MatMul has Q/DQ on both its input and weight; TensorRT would run none in int8")
    elif q_nodes:
        problems.append(f"{precision} recipe got a QDQ graph; use the fp32 ONNX for fp16/fp32 engines")
    if problems:
        raise BuildError(f"{path}: not buildable by TensorRT: " + "; ".join(problems))
    return {
        "opset": opset,
        "ops": sorted({n.op_type for n in g.node}),
        "qdq_nodes": len(q_nodes),
        "compute_layers": len(compute),
        "int8_compute_layers": quantized,
    }
