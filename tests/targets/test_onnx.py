from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest

from edgecore.spec import Precision
from targets import get_target
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
    # the global pool runs quantized too: only the input's Q and the logits' DQ are left
    assert graph["quantized_ops"]["QLinearGlobalAveragePool"] == 1
    assert graph["qdq_nodes"] == 2, graph
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


def test_one_input_path_on_bound_buffers_matches_the_batch_path_and_yields_to_a_second_caller(
        tiny_source: Any, tmp_path) -> None:
    """The one-input path reuses buffers bound to the session: each input still gets its own answer (no stale
    output), the rows it returns are not views of those buffers, and a caller that finds the buffers in use
    (another thread inside) is served by the allocating path, with the same answer."""
    from targets import one_input

    spec = tiny_source.source.input_spec
    target = get_target("onnx")
    for precision in (Precision.FP32, Precision.INT8):
        out = tmp_path / precision.value
        out.mkdir()
        art = target.build(tiny_source.source, precision, tiny_source.rep, out)
        runner = target.load(out, art.info(), spec, threads=1)
        raw = tiny_source.x_test[:30] * spec.std[0] + spec.mean[0]  # back to raw values
        ref = np.concatenate([runner.run(spec.preprocess(r[None])) for r in raw])
        path = one_input(runner, spec).run
        assert hasattr(path, "lock"), "the onnx runner's own one-input path (bound buffers) is not in use"
        rows = [path(r) for r in raw]
        np.testing.assert_allclose(np.array(rows), ref, rtol=1e-5, atol=1e-5)
        assert rows[0] != rows[1]  # distinct inputs, distinct rows: the first list was not overwritten
        with path.lock:  # a second caller meanwhile: the allocating path, the same answers
            np.testing.assert_allclose(np.array([path(r) for r in raw]), ref, rtol=1e-5, atol=1e-5)
        assert not _threads_disagree(path, raw, ref)


def _threads_disagree(path: Any, raw: np.ndarray, ref: np.ndarray, n_threads: int = 3) -> list[str]:
    """Three threads call ``path`` at once, 20 times over their share of ``raw``: the inputs answered wrong."""
    import threading

    errors: list[str] = []

    def worker(k: int) -> None:
        for _ in range(20):
            for i in range(k, len(raw), n_threads):
                if not np.allclose(path(raw[i]), ref[i], rtol=1e-5, atol=1e-5):
                    errors.append(f"thread {k} input {i}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def _act_qparams(x: tuple[float, int], y: tuple[float, int]) -> list[onnx.TensorProto]:
    """uint8 scale and zero point initializers ``xs``/``xz`` (the input's) and ``ys``/``yz`` (the output's)."""
    from onnx import numpy_helper

    out = []
    for (scale, zero), prefix in ((x, "x"), (y, "y")):
        out += [numpy_helper.from_array(np.array(scale, np.float32), f"{prefix}s"),
                numpy_helper.from_array(np.array(zero, np.uint8), f"{prefix}z")]
    return out


def _qdq_stem_graph(cin: int, couts: tuple[int, ...]) -> onnx.ModelProto:
    """float input -> Q(uint8) -> DQ -> a Conv per ``couts`` (int8 per-channel weights, zero points 0), each
    -> Q -> DQ -> a global pool; the input's DQ is also read by a pool of its own (a reader that is not a Conv)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = _act_qparams((0.02, 128), (0.05, 3))
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("GlobalAveragePool", ["xd"], ["xpool"])]
    outputs = [helper.make_tensor_value_info("xpool", TensorProto.FLOAT, [None, cin, 1, 1])]
    for i, cout in enumerate(couts):
        w = rng.integers(-127, 128, size=(cout, cin, 3, 3)).astype(np.int8)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(rng.uniform(0.001, 0.01, cout).astype(np.float32), f"ws{i}"),
                  numpy_helper.from_array(np.zeros(cout, np.int8), f"wz{i}")]
        nodes += [helper.make_node("DequantizeLinear", [f"w{i}", f"ws{i}", f"wz{i}"], [f"wd{i}"], axis=0),
                  helper.make_node("Conv", ["xd", f"wd{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("QuantizeLinear", [f"c{i}", "ys", "yz"], [f"cq{i}"]),
                  helper.make_node("DequantizeLinear", [f"cq{i}", "ys", "yz"], [f"cd{i}"]),
                  helper.make_node("GlobalAveragePool", [f"cd{i}"], [f"y{i}"])]
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [None, cout, 1, 1]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cin, 12, 12])
    graph = helper.make_graph(nodes, "stem", [x], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI): ORT's int8 kernels then do not saturate."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def test_stem_input_channels_padded_for_the_fast_int8_kernel_with_the_same_outputs(tmp_path) -> None:
    """An RGB stem (3 channels) reading a quantized input gets a zero 4th channel (ORT's x86 symmetric int8 conv
    needs input channels in 4s); a conv whose output channels keep it off that kernel anyway (9) and the input's
    other reader are left alone, and every output is the same number, with ORT's optimizations on and off."""
    from targets._qdq import ort_fusion, pad_conv_input_channels

    model = _qdq_stem_graph(3, (16, 9))
    before = tmp_path / "before.onnx"
    onnx.save(model, before)
    assert pad_conv_input_channels(model) == [{"conv": "conv0", "channels": [3, 4]}]
    onnx.checker.check_model(model)
    after = tmp_path / "after.onnx"
    onnx.save(model, after)
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    assert weights["w0"] == (16, 4, 3, 3) and weights["w1"] == (9, 3, 3, 3)
    pads = [n for n in model.graph.node if n.op_type == "Pad"]
    assert len(pads) == 1 and pads[0].input[0] == "xq"  # the quantized (uint8) tensor is padded, not the float
    graph = ort_fusion(after)  # the padded input still feeds a fused int8 convolution
    # (the graph's three outputs are float pools of dequantized tensors, by construction)
    assert graph["float_compute"] == {"GlobalAveragePool": 3} and graph["quantized_ops"]["QLinearConv"] == 2, graph
    x = np.random.default_rng(1).uniform(-2.5, 2.5, size=(2, 3, 12, 12)).astype(np.float32)
    # Bit for bit only where ORT's int8 convolution has VNNI: on x86 without it (AVX2 only) its u8s8 kernels sum
    # pairs of products in 16 bits with saturation, so the padded and the unpadded graph (different kernels) may
    # round differently (measured: up to 0.34 on outputs near 1.4 on an AMD EPYC without VNNI)
    if _has_vnni():
        for optimize in (False, True):
            for a, b in zip(_ort_logits_all(before, x, optimize), _ort_logits_all(after, x, optimize), strict=True):
                np.testing.assert_array_equal(a, b)
    # nothing left to pad: a second pass changes nothing, nor does a graph whose channels already suit the kernel
    assert pad_conv_input_channels(model) == []
    assert pad_conv_input_channels(_qdq_stem_graph(4, (16,))) == []


def _ort_logits_all(path, x: np.ndarray, optimize: bool) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _rewrite_saved(model: onnx.ModelProto, rewrite: Any, tmp_path, *, gone: str) -> tuple[Any, Any, dict[str, Any]]:
    """``model`` saved as it is, rewritten once (one rewrite expected), checked and saved again: both paths and
    ORT's fused graph of the rewritten one (in which no ``gone`` op is left)."""
    from targets._qdq import ort_fusion

    tmp_path.mkdir(exist_ok=True)
    before, after = tmp_path / "before.onnx", tmp_path / "after.onnx"
    onnx.save(model, before)
    assert rewrite(model) == 1
    onnx.checker.check_model(model)
    onnx.save(model, after)
    assert gone not in {n.op_type for n in model.graph.node}
    return before, after, ort_fusion(after)


def _with_reduce_mean(src, dst, keepdims: int = 1, flatten: bool = True) -> None:
    """The tiny fp32 graph with its GlobalAveragePool written as torch.export writes a global pool: a ReduceMean
    over the last two axes, keepdims (``AdaptiveAvgPool2d(1)``) or not (``x.mean((2, 3))``; the Flatten after it
    then keeps (N, C) as it is, and without ``flatten`` the Gemm reads the mean)."""
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    pool = next(n for n in model.graph.node if n.op_type == "GlobalAveragePool")
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, -2], np.int64), "pool_axes"))
    at = list(model.graph.node).index(pool)
    model.graph.node.remove(pool)
    model.graph.node.insert(at, helper.make_node("ReduceMean", [pool.input[0], "pool_axes"], list(pool.output),
                                                 keepdims=keepdims))
    if not flatten:
        flat = next(n for n in model.graph.node if n.op_type == "Flatten")
        model.graph.node.remove(flat)
        for n in model.graph.node:
            n.input[:] = [flat.input[0] if i == flat.output[0] else i for i in n.input]
    if model.opset_import[0].version < 18:  # axes as an input
        model.opset_import[0].version = 18
    onnx.save(model, str(dst))


@pytest.mark.parametrize("keepdims,flatten", [(1, True), (0, True), (0, False)])
def test_global_pool_quantized_with_the_same_outputs(tiny_source: Any, tmp_path, keepdims: int, flatten: bool) -> None:
    """A ReduceMean over H and W (then a Flatten, then a Q), as torch.export writes a global pool, becomes a
    GlobalAveragePool that ORT fuses into QLinearGlobalAveragePool, with or without keepdims, with or without a
    Flatten after it; the logits are the same numbers, in the built artifact too. A mean over one spatial axis
    is left alone."""
    import dataclasses

    from onnx import numpy_helper

    from targets._qdq import ort_fusion, quantize_global_pool
    from targets.onnx_target import static_quantize_onnx

    fp32 = tmp_path / "fp32_mean.onnx"
    _with_reduce_mean(tiny_source.source.onnx_fp32, fp32, keepdims, flatten)
    before = tmp_path / "before.onnx"
    static_quantize_onnx(fp32, before, tiny_source.rep)
    plain = ort_fusion(before)
    assert "QLinearGlobalAveragePool" not in plain["quantized_ops"] and plain["float_compute"] == {"ReduceMean": 1}
    model = onnx.load(str(before))
    assert [n.op_type for n in model.graph.node].count("ReduceMean") == 1
    _, after, graph = _rewrite_saved(model, quantize_global_pool, tmp_path / "rewrite", gone="ReduceMean")
    assert graph["quantized_ops"]["QLinearGlobalAveragePool"] == 1 and graph["qdq_nodes"] == 2, graph
    assert graph["float_compute"] == {}
    x = tiny_source.x_test
    for optimize in (False, True):
        a, b = _ort_logits(before, x, optimize=optimize), _ort_logits(after, x, optimize=optimize)
        np.testing.assert_array_equal(a, b)
    # the onnx target's int8 build does it
    out = tmp_path / "built"
    out.mkdir()
    art = get_target("onnx").build(dataclasses.replace(tiny_source.source, onnx_fp32=fp32), Precision.INT8,
                                   tiny_source.rep, out)
    assert art.details["quantized_pools"] == 1
    assert art.details["ort_graph"]["quantized_ops"]["QLinearGlobalAveragePool"] == 1
    one_axis = onnx.load(str(before))
    rm = next(n for n in one_axis.graph.node if n.op_type == "ReduceMean")
    axes = next(i for i in one_axis.graph.initializer if i.name == rm.input[1])
    axes.CopyFrom(numpy_helper.from_array(np.array([-1], np.int64), axes.name))
    assert quantize_global_pool(one_axis) == 0


def _qdq_pool_graph(channels: int, size: int, *, quantized_output: bool = True, **pool: Any) -> onnx.ModelProto:
    """float input -> Q(uint8) -> DQ -> AveragePool(**pool) -> Q -> DQ (or the pool's float output itself)."""
    from onnx import TensorProto, helper

    inits = _act_qparams((0.037, 7), (0.021, 3))
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("AveragePool", ["xd"], ["p" if quantized_output else "y"], name="pool", **pool)]
    if quantized_output:
        nodes += [helper.make_node("QuantizeLinear", ["p", "ys", "yz"], ["pq"]),
                  helper.make_node("DequantizeLinear", ["pq", "ys", "yz"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, channels, size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, channels, None, None])
    model = helper.make_model(helper.make_graph(nodes, "pool", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("channels,size,pool,rewritten", [
    (16, 8, {"kernel_shape": [2, 2], "strides": [2, 2]}, True),
    (24, 9, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}, True),
    (16, 8, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1}, True),
    (16, 8, {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, True),  # no partial window
    (16, 8, {"kernel_shape": [2, 3], "strides": [1, 2]}, True),
    # border windows divide by fewer than k² values: not a convolution
    (16, 8, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 0}, False),
    (16, 8, {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, False),  # a partial last window
    (16, 8, {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER"}, False),
    (4, 8, {"kernel_shape": [2, 2], "strides": [2, 2]}, False),  # too few channels to gain
])
def test_average_pool_runs_as_a_depthwise_int8_convolution_within_one_step(
        channels: int, size: int, pool: dict[str, Any], rewritten: bool, tmp_path) -> None:
    """A quantized AveragePool becomes a depthwise Conv (weights 1/k²) that ORT fuses into QLinearConv instead of
    its slow QLinearAveragePool; the outputs are the same mean rounded, so they agree to within one quantization
    step, and rarely differ at all. Pools a convolution cannot express, or too narrow to gain, are left alone."""
    from targets._qdq import average_pool_as_depthwise_conv, ort_fusion

    model = _qdq_pool_graph(channels, size, **pool)
    if not rewritten:
        plain = tmp_path / "plain.onnx"
        onnx.save(model, plain)
        assert average_pool_as_depthwise_conv(model) == 0
        assert "QLinearAveragePool" in ort_fusion(plain)["quantized_ops"]
        return
    before, after, graph = _rewrite_saved(model, average_pool_as_depthwise_conv, tmp_path, gone="AveragePool")
    assert graph["quantized_ops"] == {"QLinearConv": 1} and graph["float_compute"] == {}, graph
    x = np.random.default_rng(2).uniform(-4, 4, size=(3, channels, size, size)).astype(np.float32)
    for optimize in (False, True):
        a, b = _ort_logits_all(before, x, optimize)[0], _ort_logits_all(after, x, optimize)[0]
        assert a.shape == b.shape
        steps = np.abs(a - b) / 0.021
        assert steps.max() <= 1.0 + 1e-4 and (steps > 0.5).mean() < 0.02, (steps.max(), (steps > 0.5).mean())
    assert average_pool_as_depthwise_conv(model) == 0  # nothing left


def test_average_pool_read_in_float_is_left_alone() -> None:
    from targets._qdq import average_pool_as_depthwise_conv

    assert average_pool_as_depthwise_conv(_qdq_pool_graph(16, 8, quantized_output=False, kernel_shape=[2, 2])) == 0


def _qdq_hard_sigmoid_graph(x_scale: float, x_zero: int, out_scale: float, out_zero: int,
                            alpha: float = 1 / 6, beta: float = 0.5) -> onnx.ModelProto:
    """uint8 input -> DQ -> HardSigmoid -> Q(out_scale, out_zero) -> DQ, as a quantized hardswish gate is."""
    from onnx import TensorProto, helper

    inits = _act_qparams((x_scale, x_zero), (out_scale, out_zero))
    nodes = [helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xd"]),
             helper.make_node("HardSigmoid", ["xd"], ["h"], name="hsig", alpha=alpha, beta=beta),
             helper.make_node("QuantizeLinear", ["h", "ys", "yz"], ["hq"]),
             helper.make_node("DequantizeLinear", ["hq", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, "hsig", [helper.make_tensor_value_info("x", TensorProto.UINT8, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("x_scale,x_zero,out_scale,alpha,beta", [
    (0.05, 128, 1 / 255, 1 / 6, 0.5),   # nn.Hardswish's gate: inputs -6.4..6.35, the whole [0, 1] out
    (0.013, 40, 1 / 255, 1 / 6, 0.5),   # inputs -0.52..2.8: the gate never reaches 1
    (0.03, 200, 0.8 / 255, 1 / 6, 0.5),  # calibrated below 1: the Q saturates first
    (0.05, 100, 1 / 255, 0.2, 0.5),     # ONNX's default HardSigmoid
    (0.05, 100, 1 / 255, 0.25, -0.25),  # a negative offset
])
def test_hard_sigmoid_runs_as_a_quantized_add_within_one_step(
        x_scale: float, x_zero: int, out_scale: float, alpha: float, beta: float, tmp_path) -> None:
    """Every one of the 256 input levels gives the HardSigmoid's quantized output, or, where the exact value lies
    on a rounding boundary (x.5 steps: round numbers make ties), the other of its two roundings; ORT fuses the
    Add: no float HardSigmoid is left."""
    from targets._qdq import hard_sigmoid_as_add

    model = _qdq_hard_sigmoid_graph(x_scale, x_zero, out_scale, 0, alpha, beta)
    before, after, graph = _rewrite_saved(model, hard_sigmoid_as_add, tmp_path, gone="HardSigmoid")
    assert graph["quantized_ops"] == {"QLinearAdd": 1}, graph
    levels = np.arange(256, dtype=np.uint8)
    exact = np.clip(alpha * (levels.astype(np.float64) - x_zero) * x_scale + beta, 0, 1) / out_scale
    near_tie = np.abs(exact - np.floor(exact) - 0.5) < 1e-4
    for optimize in (False, True):
        a, b = _ort_logits_all(before, levels, optimize)[0], _ort_logits_all(after, levels, optimize)[0]
        steps = np.abs(a - b) / out_scale
        assert steps.max() <= 1.0 + 1e-4, steps.max()
        assert np.all(near_tie[steps > 0.5]), levels[(steps > 0.5) & ~near_tie]
    assert hard_sigmoid_as_add(model) == 0  # nothing left


@pytest.mark.parametrize("out_scale,out_zero", [(1.2 / 255, 0), (1 / 255, 3)])
def test_hard_sigmoid_whose_output_range_passes_its_clip_is_left_alone(out_scale: float, out_zero: int) -> None:
    """Above 1 (or below 0) the HardSigmoid's own clip, not the Q's saturation, would bound the values."""
    from targets._qdq import hard_sigmoid_as_add

    assert hard_sigmoid_as_add(_qdq_hard_sigmoid_graph(0.05, 128, out_scale, out_zero)) == 0


def _pool_and_hardswish_cnn():
    """The tiny CNN with what users' models have and the tool's families do not: a hardswish (written as
    ``x * hardsigmoid(x)``, the way torch.export writes ``nn.Hardswish``) and a 2x2 average pool."""
    from torch import nn
    from torch.nn import functional as F

    class HardSwish(nn.Module):
        def forward(self, x):
            return x * F.hardsigmoid(x)

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), HardSwish(), nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


@pytest.fixture(scope="module")
def pool_hardswish_source(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.targets.conftest import make_tiny_source

    return make_tiny_source(tmp_path_factory.mktemp("pool_hswish"), _pool_and_hardswish_cnn)


def test_int8_build_runs_average_pool_and_hardswish_quantized(pool_hardswish_source: Any, tmp_path) -> None:
    """A trained model with an average pool and a hardswish: the onnx target's int8 build rewrites both (the
    details say so; ORT's graph has no QLinearAveragePool, no float HardSigmoid, nothing in float between Q/DQ
    pairs), and answers as the same graph quantized without the rewrites does, at the same accuracy."""
    from targets._qdq import ort_fusion
    from targets.onnx_target import static_quantize_onnx

    src = pool_hardswish_source
    plain = tmp_path / "plain.onnx"
    static_quantize_onnx(src.source.onnx_fp32, plain, src.rep)
    before = ort_fusion(plain)
    assert "QLinearAveragePool" in before["quantized_ops"] and before["float_compute"] == {"HardSigmoid": 1}, before
    out = tmp_path / "built"
    out.mkdir()
    art = get_target("onnx").build(src.source, Precision.INT8, src.rep, out)
    assert art.details["pools_as_conv"] == 1 and art.details["hard_sigmoids_as_add"] == 1
    graph = art.details["ort_graph"]
    assert "QLinearAveragePool" not in graph["quantized_ops"] and graph["float_compute"] == {}
    assert graph["qdq_nodes"] == 2, graph  # the model's input and output
    x, y = src.x_test, src.y_test
    a, b = _ort_logits(plain, x), _ort_logits(out / art.main, x)
    acc_plain, acc_built = float(np.mean(a.argmax(1) == y)), float(np.mean(b.argmax(1) == y))
    assert acc_plain > 0.85 and abs(acc_built - acc_plain) <= 0.01, (acc_plain, acc_built)
    # (one input of 90 may flip between two int8 graphs: ORT's u8s8 kernels round differently on x86 without VNNI)
    assert np.mean(a.argmax(1) == b.argmax(1)) >= 0.98


def _upsample_opset9(path: Any, *, conv: bool) -> None:
    """Upsample -> Add (-> Conv) at opset 9: ONNX Runtime runs it, but quant_pre_process's opset upgrade has no
    adapter for it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(np.float32(0.5).reshape(()), "half"),
             numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Upsample", ["input", "scales"], ["up"], mode="nearest"),
             helper.make_node("Add", ["up", "half"], ["a"])]
    nodes += [helper.make_node("Conv", ["a", "w"], ["c"], pads=[1, 1, 1, 1])] if conv else []
    nodes += [helper.make_node("Flatten", ["c" if conv else "a"], ["logits"])]
    n = 1024 if conv else 256
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, n])],
                              inits if conv else inits[:2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 6
    onnx.save(model, str(path))


def test_a_failing_quant_pre_process_is_logged_once_and_recorded(tiny_source: Any, tmp_path, caplog) -> None:
    """The raw graph is quantized when ORT's pre-processing fails, but the build says so (one warning) and the
    artifact records it; a graph it pre-processes records "applied" and warns nothing."""
    import dataclasses
    import logging

    from edgecore.errors import BuildError

    t = get_target("onnx")
    ok, bad, worse = tmp_path / "ok", tmp_path / "bad", tmp_path / "worse"
    for d in (ok, bad, worse):
        d.mkdir()
    _upsample_opset9(bad / "src.onnx", conv=False)
    _upsample_opset9(worse / "src.onnx", conv=True)
    with caplog.at_level(logging.WARNING, logger="targets.onnx_target"):
        art = t.build(tiny_source.source, Precision.INT8, tiny_source.rep, ok)
        assert art.details["pre_process"] == "applied" and not caplog.records
        art = t.build(dataclasses.replace(tiny_source.source, onnx_fp32=bad / "src.onnx"), Precision.INT8,
                      tiny_source.rep, bad)
    assert art.details["pre_process"].startswith("failed: RuntimeError") and "Adapter" in art.details["pre_process"]
    warned = [r.getMessage() for r in caplog.records if "quant_pre_process failed" in r.getMessage()]
    assert len(warned) == 1 and "quantizing the graph without it" in warned[0], warned
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(bad / "model.onnx")).graph.node)
    # with a per-channel weight the raw opset-9 graph quantizes into an invalid model: the error names the cause
    with pytest.raises(BuildError, match="invalid ONNX model .*quant_pre_process had failed"):
        t.build(dataclasses.replace(tiny_source.source, onnx_fp32=worse / "src.onnx"), Precision.INT8,
                tiny_source.rep, worse)


def test_one_input_path_that_cannot_bind_its_buffers_says_so_once(tmp_path, caplog) -> None:
    """An output ORT cannot bind from numpy (strings): the one-input path allocates per call instead, with the
    same answers, one warning and ``runner.fallbacks`` saying why; a float model binds and records nothing."""
    import logging

    from onnx import TensorProto, helper

    from edgecore.spec import InputSpec
    from targets._ort import OrtRunner

    graph = helper.make_graph([helper.make_node("Cast", ["input"], ["names"], to=TensorProto.STRING)], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info("names", TensorProto.STRING, [None, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "s.onnx"))
    spec = InputSpec(name="input", shape=(None, 3), layout="NF", scale=1.0, mean=(0.0,), std=(1.0,))
    runner = OrtRunner(tmp_path / "s.onnx")
    with caplog.at_level(logging.WARNING, logger="targets._ort"):
        paths = [runner.one_input(spec) for _ in range(3)]
    assert paths[0].run(np.array([1.0, 2.0, 3.0], np.float32)) == ["1", "2", "3"]
    assert "buffers not bound" in runner.fallbacks["one_input"] and "string" in runner.fallbacks["one_input"]
    assert len([r for r in caplog.records if "cannot bind its buffers" in r.getMessage()]) == 1

    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["y"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "f.onnx"))
    floats = OrtRunner(tmp_path / "f.onnx")
    assert hasattr(floats.one_input(spec).run, "lock") and floats.fallbacks == {}
