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
from edgecore.spec import InputSpec, Precision

RECIPE_SCHEMA = 1
WORKSPACE_MIB = 256
TRT_VERSION = "10.0"  # the oldest TensorRT a recipe is checked for (the engine builder uses the TensorRT 10 API)
# ONNX opsets each TensorRT release's parser accepts (NVIDIA's support matrices): from this release on
OPSET_RANGES: dict[tuple[int, int], tuple[int, int]] = {(8, 6): (7, 17), (10, 0): (9, 20), (10, 8): (9, 22), (11, 0): (9, 25)}

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
    *, onnx_file: str, precision: Precision, spec: InputSpec, max_batch: int = 32, workspace_mib: int = WORKSPACE_MIB,
    trt_version: str = TRT_VERSION,
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
        "tensorrt": trt_version,
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


def opset_range(trt_version: str) -> tuple[int, int]:
    """(lowest, highest) ONNX opset the parser of ``trt_version`` accepts."""
    try:
        v = tuple(int(x) for x in str(trt_version).split(".")[:2])
    except ValueError as e:
        raise BuildError(f"TensorRT version {trt_version!r} is not MAJOR.MINOR") from e
    known = [k for k in sorted(OPSET_RANGES) if k <= v]
    if not known:
        raise BuildError(f"TensorRT {trt_version} is older than the oldest this toolchain checks for (8.6)")
    return OPSET_RANGES[known[-1]]


def _where(n: Any) -> str:
    return f"{n.op_type} node {n.name or n.output[0]!r}"


def _const_values(g: Any) -> dict[str, Any]:
    """Every constant tensor of the graph (initializers and Constant nodes) as numpy arrays."""
    from onnx import numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def _check_ops(g: Any, opset: int | None, trt_version: str) -> list[str]:
    lo, hi = opset_range(trt_version)
    problems = []
    if opset is None or not lo <= opset <= hi:
        problems.append(f"graph opset {opset} outside {lo}..{hi}, what TensorRT {trt_version}'s ONNX parser takes")
    for n in g.node:
        if n.domain not in ("", "ai.onnx") or n.op_type not in SUPPORTED_OPS:
            dom = f" (domain {n.domain})" if n.domain not in ("", "ai.onnx") else ""
            problems.append(f"{_where(n)}: operator {n.op_type}{dom} is not supported by TensorRT's ONNX parser")
    return problems


def _weight_axis(consumer: Any, dq: Any) -> int | None:
    """The output-channel axis TensorRT expects for a per-channel weight DQ feeding ``consumer``."""
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if consumer.op_type == "MatMul":
        return 1
    return None


def _check_qdq(g: Any, precision: Precision) -> tuple[list[str], int]:
    """TensorRT's explicit-quantization rules, one problem per offending node; (problems, int8 compute layers)."""
    consts = _const_values(g)
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    q_nodes = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if precision is not Precision.INT8:
        return ([f"{_where(n)}: a {precision} recipe got a QDQ graph; use the fp32 ONNX for fp16/fp32 engines"
                 for n in q_nodes[:1]], 0)
    if not q_nodes:
        return ["int8 needs an explicitly quantized (QDQ) graph, but it has no Q/DQ nodes"], 0
    problems = []
    for n in q_nodes:
        zp = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is not None and (zp.dtype.kind == "u" or (zp != 0).any()):
            problems.append(f"{_where(n)}: zero point {zp.dtype} {zp.ravel()[:4].tolist()}; TensorRT needs symmetric "
                            "signed int8 (zero point 0)")
        scale = consts.get(n.input[1])
        per_channel = scale is not None and scale.size > 1
        if per_channel and n.input[0] not in consts:
            problems.append(f"{_where(n)}: per-channel scales on an activation; TensorRT takes per-tensor activation scales")
        elif per_channel and n.op_type == "DequantizeLinear":
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            for c in consumers.get(n.output[0], []):
                want = _weight_axis(c, n)
                if want is not None and axis != want:
                    problems.append(f"{_where(n)}: per-channel weight scales on axis {axis}; {_where(c)} needs axis {want}")
    quantized = sum(
        all(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in c.input[:2])
        for c in g.node if c.op_type in COMPUTE_OPS
    )
    if quantized == 0:
        problems.append("no Conv/Gemm/MatMul has Q/DQ on both its input and weight; TensorRT would run none in int8")
    return problems, quantized


def _check_shapes(model: Any, recipe: dict[str, Any]) -> list[str]:
    """Shapes the optimisation profile does not cover: graph inputs, batch fixed inside the graph, outputs."""
    import onnx

    g = model.graph
    prof, name = recipe["profile"], recipe["input"]
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    problems = [f"graph input {i.name!r} has no optimisation profile (the recipe profiles {name!r} only)"
                for i in inputs if i.name != name]
    lo, hi = prof["min"], prof["max"]
    for i in (i for i in inputs if i.name == name):
        dims = i.type.tensor_type.shape.dim
        if len(dims) != len(lo):
            problems.append(f"graph input {name!r} has rank {len(dims)}, the profile {len(lo)}")
            continue
        for ax, d in enumerate(dims):
            if d.HasField("dim_value") and not lo[ax] == hi[ax] == d.dim_value:
                problems.append(f"graph input {name!r} dim {ax} is fixed at {d.dim_value}, the profile runs "
                                f"{lo[ax]}..{hi[ax]}")
    if lo[0] != hi[0]:
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:
            inferred = model
        problems += _check_reshapes(g, inferred, name, f"the profile runs batches {lo[0]}..{hi[0]}")
        producer = {o: n for n in g.node for o in n.output}
        for o in inferred.graph.output:
            dims = o.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value"):
                where = _where(producer[o.name]) if o.name in producer else f"output {o.name!r}"
                problems.append(f"{where}: output {o.name!r} has a fixed batch {dims[0].dim_value}, the profile runs "
                                f"{lo[0]}..{hi[0]}")
    return problems


def _check_reshapes(g: Any, inferred: Any, input_name: str, profile: str) -> list[str]:
    """Reshapes with a constant target shape that pin the batch.

    The batch is where the input's symbolic batch dimension (``batch``, or an expression of it such as
    ``4*batch`` once heads are folded in) sits in the reshape's inferred input shape. A fixed leading dim pins
    it only when the batch *is* the leading axis: torch's attention reshapes ``(tokens, batch, ...)`` to
    ``(tokens, heads*batch, d)`` and ``(tokens*batch, E)`` back to ``(tokens, batch, E)``, fixed leading dims
    that are the token count, with the batch in the -1. A target with neither -1 nor 0 pins it wherever it is.
    Without shapes to tell, a fixed leading dim counts.
    """
    consts = _const_values(g)
    vi = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}

    def dims(tensor: str) -> list[Any] | None:
        v = vi.get(tensor)
        if v is None or not v.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in v.type.tensor_type.shape.dim]

    source = dims(input_name)
    symbol = source[0] if source and isinstance(source[0], str) and source[0] else None

    def is_batch(d: Any) -> bool:
        return d is None or symbol is None or (isinstance(d, str) and symbol in d)

    problems = []
    for n in g.node:
        shape = consts.get(n.input[1]) if n.op_type == "Reshape" and len(n.input) > 1 else None
        if shape is None or not shape.size:
            continue
        target = [int(v) for v in shape.ravel()]
        in_dims = dims(n.input[0])
        if in_dims is not None and not any(is_batch(d) for d in in_dims):
            continue  # nothing of the batch in its input (a constant's reshape)
        if all(v > 0 for v in target) and (in_dims is None or symbol is not None):
            problems.append(f"{_where(n)}: reshapes to the fixed shape {target}, no dim left for the batch; {profile}")
        elif target[0] > 0 and (in_dims is None or not in_dims or is_batch(in_dims[0])) \
                and not (symbol is not None and in_dims and in_dims[0] == f"{target[0]}*{symbol}"):
            # (a leading ``tokens*batch`` split into [tokens, -1, ...] peels the tokens off and keeps the batch)
            problems.append(f"{_where(n)}: reshapes to a fixed leading dim {target[0]} where its input has the "
                            f"batch; {profile}")
    return problems


def check_onnx_for_tensorrt(path: Path, *, precision: Precision, recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """What TensorRT will require of the graph, checked without TensorRT; `BuildError` listing every violation.

    Opset and operators for the recipe's TensorRT version, explicit int8
    quantization TensorRT can take (symmetric signed int8, per-tensor
    activations, per-channel weights on the output-channel axis), and (with a
    recipe) no shape the optimisation profile does not cover. Each violation
    names its node.
    """
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:
        raise BuildError(f"{path}: invalid ONNX ({e})") from e
    trt_version = str((recipe or {}).get("tensorrt", TRT_VERSION))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    g = model.graph
    problems = _check_ops(g, opset, trt_version)
    qdq_problems, quantized = _check_qdq(g, precision)
    problems += qdq_problems
    if recipe is not None:
        problems += _check_shapes(model, recipe)
    if problems:
        raise BuildError(f"{path}: not buildable by TensorRT {trt_version}: " + "; ".join(problems))
    return {
        "tensorrt": trt_version,
        "opset": opset,
        "ops": sorted({n.op_type for n in g.node}),
        "qdq_nodes": sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node),
        "compute_layers": sum(n.op_type in COMPUTE_OPS for n in g.node),
        "int8_compute_layers": quantized,
    }
