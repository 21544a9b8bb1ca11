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


def test_one_input_path_on_bound_buffers_matches_the_batch_path_and_yields_to_a_second_caller(
        tiny_source: Any, tmp_path) -> None:
    """The one-input path reuses buffers bound to the session: each input still gets its own answer (no stale
    output), the rows it returns are not views of those buffers, and a caller that finds the buffers in use
    (another thread inside) is served by the allocating path, with the same answer."""
    from edgecore.manifest import ArtifactInfo
    from targets import one_input

    spec = tiny_source.source.input_spec
    target = get_target("onnx")
    for precision in (Precision.FP32, Precision.INT8):
        out = tmp_path / precision.value
        out.mkdir()
        art = target.build(tiny_source.source, precision, tiny_source.rep, out)
        runner = target.load(out, ArtifactInfo(main=art.main, runtime=art.runtime, details=art.details), spec,
                             threads=1)
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
