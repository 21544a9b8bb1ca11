"""QDQ ONNX graphs for CPU runtimes: the quantization scheme, the int8 -> uint8 rewrite, ORT's fused graph.

ONNX Runtime's CPU kernels (QLinearConv, QLinearAdd, QGemm) are built for
uint8 activations with int8 weights; with signed int8 activations its
optimizer leaves convolutions and adds in fp32 between Q/DQ pairs and int8
runs slower than fp32. `activations_to_uint8` rewrites every activation
Q/DQ pair from int8 to uint8 with the zero point moved by +128: q_u8 = q_s8 +
128 for every value, so the graph computes exactly the same numbers.
`pad_conv_input_channels` pads the input channels of convolutions whose
channel count keeps them off ORT's fast x86 int8 kernel (an RGB stem: 3
channels) with zero channels, also exact. `quantize_global_pool` turns the
exporters' spatial ReduceMean between a DequantizeLinear and a QuantizeLinear
into a GlobalAveragePool that ORT runs quantized (and in NHWC) instead of a
transpose + dequantize + float mean + quantize. `average_pool_as_depthwise_conv`
turns a quantized AveragePool (ORT's QLinearAveragePool: 10x slower than the
float pool) into the depthwise convolution it is, which ORT's int8 depthwise
kernel runs; both round the same exact mean, and may differ by one step where
it lies close to a rounding boundary. `hard_sigmoid_as_add` runs a quantized
HardSigmoid (nn.Hardswish and nn.Hardsigmoid as torch exports them), which ORT
has no int8 kernel for, as the quantized Add it is up to a scale.
`ort_fusion` runs ORT's optimizer (``SessionOptions.optimized_model_filepath``)
and counts what is left in float.
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["activations_to_uint8", "pad_conv_input_channels", "quantize_global_pool",
           "average_pool_as_depthwise_conv", "hard_sigmoid_as_add", "qdq_scheme", "ort_fusion", "FLOAT_COMPUTE_OPS"]

#: ops that, left in ORT's optimized graph, are compute running in float (between a dequantize and a quantize,
#: where the rewrites below did not apply)
FLOAT_COMPUTE_OPS = ("Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "Add", "ConvTranspose", "AveragePool",
                     "GlobalAveragePool", "ReduceMean", "HardSigmoid")
_QOPS = ("QuantizeLinear", "DequantizeLinear")


def _inits(model: Any) -> dict[str, Any]:
    return {i.name: i for i in model.graph.initializer}


def _readers(graph: Any) -> dict[str, list[Any]]:
    """Tensor name -> the nodes that read it (once per input slot)."""
    readers: dict[str, list[Any]] = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            readers[i].append(n)
    return readers


def _producers(graph: Any) -> dict[str, Any]:
    """Tensor name -> the node that writes it."""
    return {o: n for n in graph.node for o in n.output}


def _index(model: Any) -> tuple[Any, dict[str, Any], dict[str, Any], dict[str, list[Any]], set[str]]:
    """What a rewrite looks things up in: the graph, its initializers, producers, readers, output names."""
    g = model.graph
    return g, _inits(model), _producers(g), _readers(g), {o.name for o in g.output}


def _shapes(model: Any) -> dict[str, list[int | None]] | None:
    """Tensor name -> its inferred dims (None where unknown), or None where ONNX's shape inference fails."""
    from onnx import shape_inference

    try:
        inferred = shape_inference.infer_shapes(model).graph
    except Exception:
        return None
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.value_info, *inferred.input] if v.type.tensor_type.HasField("shape")}


def _replace_node(graph: Any, old: Any, *new: Any) -> None:
    """``new`` nodes, in order, where ``old`` was (the graph stays topologically sorted)."""
    at = list(graph.node).index(old)
    graph.node.remove(old)
    for i, n in enumerate(new):
        graph.node.insert(at + i, n)


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
    consumers = _readers(g)
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


#: ORT's x86 symmetric int8 convolution (MLAS ``ConvSym``, AVX2/AVX-VNNI/AVX-512): it takes a convolution whose
#: input channels are a multiple of 4 and whose output channels are a multiple of 4, at least 16; others run
#: im2col + a generic int8 GEMM, which on a 3-channel 224x224 stem is ~2x slower. (On ARM64 ORT takes that
#: kernel only from 64 input channels: a padded stem there runs the generic path with a third more stem MACs.)
SYM_CONV_CHANNEL_MULTIPLE = 4
SYM_CONV_MIN_OUTPUT_CHANNELS = 16


def _attr(node: Any, name: str, default: Any) -> Any:
    """The value of attribute ``name`` (int, float, string or list, as ONNX stores it), else ``default``."""
    from onnx import helper

    value = next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)
    return value.decode() if isinstance(value, bytes) else value


def pad_conv_input_channels(model: Any, multiple: int = SYM_CONV_CHANNEL_MULTIPLE) -> list[dict[str, Any]]:
    """Give QDQ convolutions that ORT runs off its fast int8 kernel only for their input channel count zero
    input channels up to ``multiple`` (in place); returns what was padded: ``{"conv", "channels": [old, new]}``.

    A convolution qualifies when it is not grouped, reads ``DQ(Q(t))``, and its weight is a 4-D int8 initializer
    behind a DequantizeLinear with zero points 0 (per-tensor or per output channel) whose output channels already
    suit the kernel. The quantized tensor is padded (``Pad`` with the zero point, uint8 or int8: a quarter of the
    bytes of padding the float) into a DequantizeLinear of its own, so other readers of ``t`` are unchanged, and
    the weight gets zero channels: every output is the same number.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:  # Pad's pads and value as inputs
        return []
    inits = _inits(model)
    producer = _producers(g)
    readers = _readers(g)
    padded: dict[tuple[str, int], str] = {}  # (Q output, new channel count) -> padded DQ output
    done: list[dict[str, Any]] = []
    for conv in [n for n in g.node if n.op_type == "Conv"]:
        if _attr(conv, "group", 1) != 1 or len(conv.input) < 2:
            continue
        dq, wdq = producer.get(conv.input[0]), producer.get(conv.input[1])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if dq is None or q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3 or q.input[2] not in inits:
            continue
        if (wdq is None or wdq.op_type != "DequantizeLinear" or wdq.input[0] not in inits
                or len(readers[wdq.input[0]]) != 1 or len(readers[wdq.output[0]]) != 1):  # this conv's alone
            continue
        w = numpy_helper.to_array(inits[wdq.input[0]])
        zp = numpy_helper.to_array(inits[wdq.input[2]]) if len(wdq.input) > 2 and wdq.input[2] else np.zeros(1)
        scale = numpy_helper.to_array(inits[wdq.input[1]]) if wdq.input[1] in inits else None
        if w.dtype != np.int8 or w.ndim != 4 or np.any(zp != 0) or scale is None:
            continue
        if scale.size > 1 and _attr(wdq, "axis", 1) != 0:
            continue
        cout, cin = w.shape[:2]
        if cin % multiple == 0 or cout % multiple or cout < SYM_CONV_MIN_OUTPUT_CHANNELS:
            continue
        new = cin + (-cin) % multiple
        key = (q.output[0], new)
        if key not in padded:
            base = f"{q.output[0]}_chpad{new}"
            g.initializer.append(  # NCHW: begins of the 4 axes, then ends; zero channels after the last
                numpy_helper.from_array(np.array([0, 0, 0, 0, 0, new - cin, 0, 0], np.int64), f"{base}_pads"))
            pad = helper.make_node("Pad", [q.output[0], f"{base}_pads", q.input[2]], [f"{base}_q"],
                                   name=f"{base}_pad", mode="constant")
            dq2 = helper.make_node("DequantizeLinear", [f"{base}_q", *dq.input[1:]], [f"{base}_dq"],
                                   name=f"{base}_dq")
            at = list(g.node).index(dq)
            g.node.insert(at, dq2)
            g.node.insert(at, pad)
            padded[key] = dq2.output[0]
        w_init = inits[wdq.input[0]]
        w_init.CopyFrom(numpy_helper.from_array(
            np.concatenate([w, np.zeros((cout, new - cin, *w.shape[2:]), np.int8)], axis=1), w_init.name))
        conv.input[0] = padded[key]
        done.append({"conv": conv.name or conv.output[0], "channels": [int(cin), int(new)]})
    if done:  # a DQ no longer read by anything goes
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        for n in [n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] not in used]:
            g.node.remove(n)
    return done


_SHAPE_OPS = ("Reshape", "Flatten", "Squeeze")


def quantize_global_pool(model: Any) -> int:
    """Rewrite ``DQ -> ReduceMean(every spatial axis) -> [Reshape|Flatten|Squeeze] -> Q`` to a
    GlobalAveragePool quantized with that Q's scale and zero point (in place); returns how many.

    torch exports ``AdaptiveAvgPool2d(1)`` / ``mean((2, 3), keepdim=True)`` as a ReduceMean, which ORT leaves in
    float: a transpose out of NHWC, a dequantize, the mean, a quantize. GlobalAveragePool between a DQ and a Q is
    fused into ``QLinearGlobalAveragePool`` (NHWC). With a shape op between the mean and the Q, a Q/DQ pair with
    the same parameters goes before the shape op: a reshape does not change values, so the numbers are the same.
    A mean without keepdims (``x.mean((2, 3))``, as torchvision's ShuffleNet and MNASNet end) becomes the pool,
    that Q/DQ pair and a Flatten to (N, C), unless a Flatten or Reshape after it already makes (N, C).
    """
    from onnx import helper, numpy_helper

    g, inits, producer, consumers, graph_outputs = _index(model)
    means = [n for n in g.node if n.op_type == "ReduceMean"]
    shapes = _shapes(model) if means else None
    if shapes is None:  # shapes are only needed to know the rank; without them nothing is rewritten
        return 0
    count = 0
    for rm in means:
        r = len(shapes.get(rm.input[0], []))
        dq = producer.get(rm.input[0])
        keepdims = _attr(rm, "keepdims", 1)
        if r < 3 or dq is None or dq.op_type != "DequantizeLinear":
            continue
        if len(rm.input) > 1 and rm.input[1]:
            if rm.input[1] not in inits:
                continue
            axes = numpy_helper.to_array(inits[rm.input[1]]).tolist()
        else:
            axes = next((list(a.ints) for a in rm.attribute if a.name == "axes"), [])
        if sorted(a % r for a in axes) != list(range(2, r)) or rm.output[0] in graph_outputs:
            continue
        nxt = consumers[rm.output[0]]
        if len(nxt) != 1:
            continue
        shape_op = nxt[0] if nxt[0].op_type in _SHAPE_OPS and nxt[0].output[0] not in graph_outputs else None
        qs = consumers[shape_op.output[0]] if shape_op is not None else nxt
        if not qs or any(q.op_type != "QuantizeLinear" or list(q.input[1:]) != list(qs[0].input[1:]) for q in qs):
            continue
        # a Flatten(axis=1) or Reshape after the mean gives the same from (N, C, 1, 1) as from (N, C): it can take
        # the pool's output as it is; any other reader of a mean without keepdims gets the (N, C) it had
        flat = not keepdims and not (shape_op is not None and (
            shape_op.op_type == "Reshape" or (shape_op.op_type == "Flatten" and _attr(shape_op, "axis", 1) == 1)))
        out = f"{rm.output[0]}_pooled" if flat else rm.output[0]
        pool = helper.make_node("GlobalAveragePool", [rm.input[0]], [out], name=rm.name or rm.output[0])
        added: list[Any] = []
        if shape_op is not None or flat:
            qparams = list(qs[0].input[1:])
            q = helper.make_node("QuantizeLinear", [out, *qparams], [f"{out}_q"], name=f"{pool.name}_q")
            dq2 = helper.make_node("DequantizeLinear", [q.output[0], *qparams], [f"{out}_dq"], name=f"{pool.name}_dq")
            added = [q, dq2]
            if not flat and shape_op is not None:  # (not flat: a shape op reads the pool)
                shape_op.input[0] = dq2.output[0]
            else:  # (N, C, 1, 1) -> (N, C), what the mean wrote; its readers are unchanged
                added.append(helper.make_node("Flatten", [dq2.output[0]], [rm.output[0]], name=f"{pool.name}_flat",
                                              axis=1))
        _replace_node(g, rm, pool, *added)
        count += 1
    return count


#: below this many channels QLinearAveragePool is as fast as the depthwise kernel (2x2 on 64x64: 3 channels 102
#: µs against 141, 4: 131 against 142, 5: 158 against 136, 8: 244 against 122, with the Q/DQ at the edges)
POOL_AS_CONV_MIN_CHANNELS = 8


def average_pool_as_depthwise_conv(model: Any) -> int:
    """Rewrite ``DQ -> AveragePool (2-D) -> Q`` as ``DQ -> depthwise Conv -> Q`` (in place); returns how many.

    An average over a k x k window is a depthwise convolution whose weights are all 1 / k²: here int8 127 with
    the scale 1 / (127 k²), zero point 0, per tensor, so ORT fuses it into a QLinearConv and runs its int8
    depthwise kernel instead of QLinearAveragePool (on a 96-channel 32x32 map, 2x2: 722 µs against 54, and
    the float pool's 53). The convolution counts padding as zeros and divides by k² everywhere, so a padded
    pool qualifies only with ``count_include_pad=1``; ``ceil_mode=1`` only where it adds no partial window;
    no dilations, no SAME padding. The pool's readers must all be QuantizeLinear (what ORT fuses), and it has
    at least `POOL_AS_CONV_MIN_CHANNELS` channels.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    g, inits, producer, consumers, graph_outputs = _index(model)
    pools = [n for n in g.node if n.op_type == "AveragePool"]
    shapes = _shapes(model) if pools else None
    if shapes is None:  # the channel count comes from the shapes; without them nothing is rewritten
        return 0
    count = 0
    for pool in pools:
        dq = producer.get(pool.input[0])
        shape = shapes.get(pool.input[0], [])
        if (dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in inits or len(shape) != 4
                or (shape[1] or 0) < POOL_AS_CONV_MIN_CHANNELS):
            continue
        readers = consumers[pool.output[0]]
        if not readers or pool.output[0] in graph_outputs or any(r.op_type != "QuantizeLinear" for r in readers):
            continue
        kernel = list(_attr(pool, "kernel_shape", []))
        strides = list(_attr(pool, "strides", None) or [1] * len(kernel))
        pads = list(_attr(pool, "pads", None) or [0] * 2 * len(kernel))
        if len(kernel) != 2 or any(d != 1 for d in _attr(pool, "dilations", [1, 1])):
            continue
        if _attr(pool, "auto_pad", "NOTSET") not in ("NOTSET", "VALID") or (any(pads) and not _attr(
                pool, "count_include_pad", 0)):
            continue
        if _attr(pool, "ceil_mode", 0):  # the same windows as floor mode only where none is partial
            spatial = shape[2:]
            if any(d is None or (d + pads[i] + pads[i + 2] - kernel[i]) % strides[i]
                   for i, d in enumerate(spatial)):
                continue
        channels, n = int(shape[1] or 0), int(np.prod(kernel))  # (checked above: at least the minimum)
        base = f"{pool.name or pool.output[0]}_dwconv"
        g.initializer.extend([
            numpy_helper.from_array(np.full((channels, 1, *kernel), 127, np.int8), f"{base}_w"),
            numpy_helper.from_array(np.array(1.0 / (127 * n), np.float32), f"{base}_w_scale"),
            numpy_helper.from_array(np.array(0, np.int8), f"{base}_w_zero_point")])
        wdq = helper.make_node("DequantizeLinear", [f"{base}_w", f"{base}_w_scale", f"{base}_w_zero_point"],
                               [f"{base}_wdq"], name=f"{base}_wdq")
        conv = helper.make_node("Conv", [pool.input[0], wdq.output[0]], list(pool.output), name=base,
                                group=channels, kernel_shape=kernel, strides=strides, pads=pads)
        _replace_node(g, pool, wdq, conv)
        count += 1
    return count


def hard_sigmoid_as_add(model: Any) -> int:
    """Rewrite ``DQ -> HardSigmoid(alpha, beta) -> Q(s, 0)`` as ``DQ -> Add(beta / alpha) -> Q(s / alpha, 0)``
    (in place); returns how many.

    torch exports ``nn.Hardswish`` as ``x * HardSigmoid(x)`` and ``nn.Hardsigmoid`` as a HardSigmoid, for which
    ORT has no quantized kernel: it dequantizes, runs the float op and quantizes again (on a 24-channel 128x128
    map: 248 + 189 + 139 µs). With ``t = v + beta / alpha``, ``HardSigmoid(v) = clip(alpha * t, 0, 1)``: the
    same integers come out of quantizing ``t`` with the scale ``s / alpha``, where the Q's range lies inside [0,
    1] (zero point 0, ``255 s <= 1``), because the Q's own saturation then does the clipping. The readers still
    dequantize with ``s`` and see the HardSigmoid's values. ORT fuses the Add into a QLinearAdd (118 µs there).
    Both compute the same exact value, and may round it differently by one step where it lies close to a
    rounding boundary.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g, inits, producer, readers, graph_outputs = _index(model)
    count = 0
    for hs in [n for n in g.node if n.op_type == "HardSigmoid"]:
        dq, qs = producer.get(hs.input[0]), readers[hs.output[0]]
        if dq is None or dq.op_type != "DequantizeLinear" or len(qs) != 1 or qs[0].op_type != "QuantizeLinear":
            continue
        q = qs[0]
        if hs.output[0] in graph_outputs or len(q.input) < 3 or q.input[1] not in inits or q.input[2] not in inits:
            continue
        scale, zero = numpy_helper.to_array(inits[q.input[1]]), numpy_helper.to_array(inits[q.input[2]])
        alpha, beta = float(_attr(hs, "alpha", 0.2)), float(_attr(hs, "beta", 0.5))
        if (scale.size != 1 or zero.size != 1 or inits[q.input[2]].data_type != TensorProto.UINT8 or int(zero) != 0
                or not 0 < 255 * float(scale) <= 1 + 1e-6 or alpha <= 0):
            continue
        base = hs.name or hs.output[0]
        offset = beta / alpha  # as (1 - 0) or (0 - 1) times |offset|: dequantized, exactly that
        value, zp = (1, 0) if offset > 0 else (0, 1) if offset < 0 else (0, 0)
        g.initializer.extend([
            numpy_helper.from_array(np.array(value, np.uint8), f"{base}_offset_q"),
            numpy_helper.from_array(np.array(abs(offset) or 1.0, np.float32), f"{base}_offset_scale"),
            numpy_helper.from_array(np.array(zp, np.uint8), f"{base}_offset_zero_point"),
            numpy_helper.from_array(np.array(float(scale) / alpha, np.float32), f"{base}_shifted_scale")])
        cdq = helper.make_node("DequantizeLinear", [f"{base}_offset_q", f"{base}_offset_scale",
                                                    f"{base}_offset_zero_point"], [f"{base}_offset"],
                               name=f"{base}_offset_dq")
        add = helper.make_node("Add", [hs.input[0], cdq.output[0]], list(hs.output), name=f"{base}_as_add")
        q.input[1] = f"{base}_shifted_scale"
        _replace_node(g, hs, cdq, add)
        count += 1
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
    quantized = {o: c for o, c in sorted(ops.items()) if _integer_op(o)}
    return {
        "qdq_nodes": sum(ops[o] for o in _QOPS),
        "float_compute": {o: ops[o] for o in FLOAT_COMPUTE_OPS if ops[o]},
        "quantized_ops": quantized,
        # everything else that computes, in float: what a reader of the manifest asks first of an int8
        # transformer (attention's activation x activation MatMuls, Softmax, LayerNormalization, GELU's Erf)
        "float_ops": {o: c for o, c in sorted(ops.items()) if o not in quantized and o not in _QOPS
                      and o not in LAYOUT_OPS},
    }


#: ONNX operators that only move, reshape or describe data: neither float nor int8 compute
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Shape", "Gather", "Concat",
                        "Slice", "Constant", "Identity", "Cast", "Expand", "Split", "Pad"})


def _integer_op(op: str) -> bool:
    """ORT's integer kernels: QLinear*, QGemm, MatMulInteger(ToFloat), ConvInteger, DynamicQuantize*."""
    return op.startswith(("QLinear", "MatMulInteger", "DynamicQuantize")) or op in ("QGemm", "ConvInteger")
