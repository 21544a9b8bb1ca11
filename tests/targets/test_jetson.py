"""Jetson/TensorRT: everything up to the engine build for real; the TensorRT calls against a stand-in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from edgecore.errors import AccuracyGateError, BuildError
from edgecore.manifest import ArtifactInfo
from edgecore.spec import Precision
from targets import get_target
from targets.jetson.engine import EngineCache, build_engine, engine_key
from targets.jetson.proxy import round_through_fp16
from targets.jetson.recipe import check_onnx_for_tensorrt, make_recipe, trtexec_command
from tests.targets import trt_standin
from tests.targets.contract import TargetContract
from toolchain.verify import compare


class TestJetsonContract(TargetContract):
    target_name = "jetson"


@pytest.fixture(scope="module")
def jetson_builds(tiny_source: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    t = get_target("jetson")
    out = {}
    for p in (Precision.FP16, Precision.INT8):
        d = tmp_path_factory.mktemp(f"jetson-{p.value}")
        out[p.value] = (d, t.build(tiny_source.source, p, tiny_source.rep, d))
    return out


def test_recipe_and_trtexec_line(jetson_builds: dict[str, Any]) -> None:
    d, art = jetson_builds["int8"]
    recipe = json.loads((d / "trt_recipe.json").read_text())
    assert recipe["builder_flags"] == ["INT8", "FP16"] and recipe["quantization"] == "explicit-qdq"
    assert recipe["profile"] == {"min": [1, 1, 8, 8], "opt": [8, 1, 8, 8], "max": [32, 1, 8, 8]}
    cmd = recipe["trtexec"]
    for part in ("trtexec", "--onnx=model.onnx", "--minShapes=input:1x1x8x8", "--maxShapes=input:32x1x8x8", "--int8", "--fp16",
                 "--memPoolSize=workspace:256M"):
        assert part in cmd
    d16, _ = jetson_builds["fp16"]
    r16 = json.loads((d16 / "trt_recipe.json").read_text())
    assert r16["builder_flags"] == ["FP16"] and "--int8" not in r16["trtexec"]


def test_int8_graph_is_tensorrt_ready(jetson_builds: dict[str, Any]) -> None:
    d, art = jetson_builds["int8"]
    chk = art.details["tensorrt_check"]
    assert chk["int8_compute_layers"] == chk["compute_layers"] > 0
    m = onnx.load(str(d / "model.onnx"))
    zps = [onnx.numpy_helper.to_array(i) for i in m.graph.initializer if i.data_type == onnx.TensorProto.UINT8]
    assert not zps, "TensorRT needs signed symmetric int8"


def test_check_rejects_what_tensorrt_would(tiny_source: Any, tmp_path: Path) -> None:
    m = onnx.load(str(tiny_source.source.onnx_fp32))
    with pytest.raises(BuildError, match="no Q/DQ nodes"):
        check_onnx_for_tensorrt(tiny_source.source.onnx_fp32, precision=Precision.INT8)
    # an operator outside the parser's list
    m.graph.node[-1].op_type = "NonMaxSuppression"
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(BuildError, match="NonMaxSuppression"):
        check_onnx_for_tensorrt(bad, precision=Precision.FP16)
    # fp16 must refuse a QDQ graph
    with pytest.raises(BuildError, match="use the fp32 ONNX"):
        check_onnx_for_tensorrt(tiny_source.qdq_source.onnx_qdq, precision=Precision.FP16)


def _info(art: Any) -> ArtifactInfo:
    return art.info()


def _recipe(d: Path) -> dict[str, Any]:
    return json.loads((d / "trt_recipe.json").read_text())


def _node(m: onnx.ModelProto, op: str) -> onnx.NodeProto:
    return next(n for n in m.graph.node if n.op_type == op)


def test_each_tensorrt_violation_names_its_node(jetson_builds: dict[str, Any], tmp_path: Path) -> None:
    d, _ = jetson_builds["int8"]
    m = onnx.load(str(d / "model.onnx"))
    q = _node(m, "QuantizeLinear")
    zp = next(i for i in m.graph.initializer if i.name == q.input[2])
    zp.CopyFrom(onnx.numpy_helper.from_array(np.array(3, np.int8), zp.name))  # asymmetric
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # batch fixed at 1, the profile runs 1..32
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(BuildError) as e:
        check_onnx_for_tensorrt(bad, precision=Precision.INT8, recipe=_recipe(d))
    msg = str(e.value)
    assert f"QuantizeLinear node {q.name!r}: zero point int8 [3]" in msg
    assert "graph input 'input' dim 0 is fixed at 1, the profile runs 1..32" in msg
    assert "output 'logits' has a fixed batch 1" in msg
    # the opset TensorRT 8.6's parser takes ends at 17; this graph is opset 18
    with pytest.raises(BuildError, match=r"opset 18 outside 7\.\.17, what TensorRT 8\.6"):
        check_onnx_for_tensorrt(d / "model.onnx", precision=Precision.INT8, recipe={**_recipe(d), "tensorrt": "8.6"})
    assert check_onnx_for_tensorrt(d / "model.onnx", precision=Precision.INT8, recipe=_recipe(d))["tensorrt"] == "10.0"


def test_reshape_that_fixes_the_batch_is_named(tiny_source: Any, jetson_builds: dict[str, Any], tmp_path: Path) -> None:
    d, _ = jetson_builds["fp16"]
    m = onnx.load(str(d / "model.onnx"))
    flat = next((n for n in m.graph.node if n.op_type in ("Flatten", "Reshape")), None)
    assert flat is not None
    shape = onnx.numpy_helper.from_array(np.array([1, -1], np.int64), "fixed_batch_shape")
    m.graph.initializer.append(shape)
    flat.op_type, flat.input[:] = "Reshape", [flat.input[0], "fixed_batch_shape"]
    del flat.attribute[:]
    bad = tmp_path / "reshape.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(BuildError, match=rf"Reshape node {flat.name!r}: reshapes to a fixed leading dim 1 where its input has "
                                         r"the batch; the profile runs "
                                         r"batches 1\.\.32"):
        check_onnx_for_tensorrt(bad, precision=Precision.FP16, recipe=_recipe(d))


def test_proxy_runs_the_bundles_own_graph(tiny_source: Any, jetson_builds: dict[str, Any]) -> None:
    t = get_target("jetson")
    for precision, floor in (("fp16", 0.99), ("int8", 0.95)):
        d, art = jetson_builds[precision]
        proxy = t.proxy(d, _info(art), art.precision, None)
        assert proxy.runtime.startswith("onnxruntime") and proxy.not_modelled
        logits = proxy.runner.run(tiny_source.x_test)
        agree = float((logits.argmax(1) == tiny_source.ref_logits.argmax(1)).mean())
        assert agree >= floor, (precision, agree)
        res = compare(logits, tiny_source.ref_logits, tiny_source.y_test, precision=Precision(precision), budget_pt=2.0)
        assert res.passed, res.problems


def test_fp16_proxy_rounds_every_activation(tiny_source: Any) -> None:
    from targets._ort import OrtRunner

    m = onnx.load(str(tiny_source.source.onnx_fp32))
    exact = OrtRunner(m.SerializeToString(), optimize=False).run(tiny_source.x_test)
    half = OrtRunner(round_through_fp16(m, weights=True).SerializeToString(), optimize=False).run(tiny_source.x_test)
    np.testing.assert_array_equal(half, half.astype(np.float16).astype(np.float32))  # the logits are fp16 values
    assert 0 < float(np.abs(half - exact).max()) < 0.1
    casts = sum(n.op_type == "Cast" for n in round_through_fp16(m, weights=False).graph.node)
    assert casts == 2 * (1 + len(m.graph.node))  # the input and every node's float output


def test_broken_classifier_fails_the_proxy_gate(tiny_source: Any, jetson_builds: dict[str, Any], tmp_path: Path) -> None:
    """An int8 graph TensorRT would build without complaint, whose classifier weights have a degenerate scale."""
    d0, art = jetson_builds["int8"]
    d = tmp_path / "broken"
    shutil.copytree(d0, d)
    m = onnx.load(str(d / "model.onnx"))
    producer = {o: n for n in m.graph.node for o in n.output}
    fc = _node(m, "Gemm")
    dq = producer[fc.input[1]]
    assert dq.op_type == "DequantizeLinear"
    scale = next(i for i in m.graph.initializer if i.name == dq.input[1])
    scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * np.float32(1e-6), scale.name))
    onnx.save(m, str(d / "model.onnx"))
    check_onnx_for_tensorrt(d / "model.onnx", precision=Precision.INT8, recipe=_recipe(d))  # structurally fine
    proxy = get_target("jetson").proxy(d, _info(art), art.precision, None)
    res = compare(proxy.runner.run(tiny_source.x_test), tiny_source.ref_logits, tiny_source.y_test,
                  precision=Precision.INT8, budget_pt=1.0)
    assert res.gate_failed and res.accuracy < 0.5
    with pytest.raises(AccuracyGateError, match="below the PyTorch reference"):
        res.raise_if_failed("jetson int8 build")


def test_engine_builder_against_standin(jetson_builds: dict[str, Any]) -> None:
    assert trt_standin.IS_STANDIN
    d, _ = jetson_builds["int8"]
    recipe = json.loads((d / "trt_recipe.json").read_text())
    engine = json.loads(build_engine(d / "model.onnx", recipe, trt=trt_standin))
    assert engine["flags"] == ["FP16", "INT8"]
    assert engine["pools"] == {"WORKSPACE": 256 << 20}
    assert engine["profiles"] == [{"input": [[1, 1, 8, 8], [8, 1, 8, 8], [32, 1, 8, 8]]}]
    assert "QuantizeLinear" in engine["ops"]


def test_engine_builder_reports_parser_and_build_errors(tmp_path: Path, jetson_builds: dict[str, Any]) -> None:
    d, _ = jetson_builds["fp16"]
    recipe = json.loads((d / "trt_recipe.json").read_text())
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    with pytest.raises(BuildError, match="could not parse"):
        build_engine(broken, recipe, trt=trt_standin)
    trt_standin.Builder.fail_build = True
    try:
        with pytest.raises(BuildError, match="failed to build an engine"):
            build_engine(d / "model.onnx", recipe, trt=trt_standin)
    finally:
        trt_standin.Builder.fail_build = False


def test_engine_cache_is_keyed_by_gpu_and_tensorrt(tmp_path: Path, jetson_builds: dict[str, Any]) -> None:
    d, _ = jetson_builds["fp16"]
    recipe = json.loads((d / "trt_recipe.json").read_text())
    onnx_path = d / "model.onnx"
    orin = EngineCache(tmp_path, trt=trt_standin, gpu=lambda: "NVIDIA Jetson AGX Orin")
    p1, built1 = orin.get(onnx_path, recipe)
    p2, built2 = orin.get(onnx_path, recipe)
    assert built1 and not built2 and p1 == p2  # second call is a cache hit
    assert "nvidia-jetson-agx-orin" in p1.name and "trt10.99.0" in p1.name
    nano = EngineCache(tmp_path, trt=trt_standin, gpu=lambda: "NVIDIA Jetson Orin Nano")
    p3, built3 = nano.get(onnx_path, recipe)
    assert built3 and p3 != p1  # another GPU never reuses an engine
    k1 = engine_key(onnx_path=onnx_path, recipe=recipe, gpu="g", trt_version="10.0")
    k2 = engine_key(onnx_path=onnx_path, recipe=recipe, gpu="g", trt_version="10.1")
    k3 = engine_key(onnx_path=onnx_path, recipe={**recipe, "builder_flags": []}, gpu="g", trt_version="10.0")
    assert len({k1.filename, k2.filename, k3.filename}) == 3
    assert json.loads(p1.with_suffix(".json").read_text())["gpu"] == "NVIDIA Jetson AGX Orin"


def test_recipe_shapes_follow_the_input_spec() -> None:
    from edgecore.spec import InputSpec

    spec = InputSpec(name="features", shape=(None, 30), layout="NF")
    r = make_recipe(onnx_file="model.onnx", precision=Precision.FP32, spec=spec, max_batch=4)
    assert r["profile"] == {"min": [1, 30], "opt": [4, 30], "max": [4, 30]} and r["builder_flags"] == []
    assert "--optShapes=features:4x30" in trtexec_command(r)


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_real_tensorrt_engine_passes_the_gate(jetson_builds: dict[str, Any], tiny_source: Any, precision: str) -> None:
    """The engine built on this GPU from the bundle's recipe (int8: the explicit Q/DQ graph and its calibration
    cache) runs the test split and passes the same accuracy gate a build applies."""
    t = get_target("jetson")
    ok, why = t.available()
    if not ok:
        pytest.skip(f"needs TensorRT and an NVIDIA GPU (make test-gpu): {why}")
    d, art = jetson_builds[precision]
    runner = t.load(d, art.info(t.runtime_version()), tiny_source.source.input_spec)
    logits = np.concatenate([runner.run(tiny_source.x_test[i:i + 32]) for i in range(0, len(tiny_source.x_test), 32)])
    res = compare(logits, tiny_source.ref_logits, tiny_source.y_test, precision=Precision(precision), budget_pt=1.0)
    assert res.passed, res.problems


def test_a_transformers_token_count_is_not_taken_for_the_batch(tmp_path: Path) -> None:
    """torch's attention reshapes (tokens, batch, E) with the token count leading: not a fixed batch."""
    from tests.toolchain.user_factories import user_vit
    from toolchain.export import export_onnx

    path = tmp_path / "vit.onnx"
    export_onnx(user_vit(input_shape=(1, 8, 8), num_classes=10).eval(), path, input_shape=(1, 8, 8), opset=18)
    recipe = {"input": "input", "profile": {"min": [1, 1, 8, 8], "opt": [8, 1, 8, 8], "max": [32, 1, 8, 8]}}
    m = onnx.load(str(path))
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    consts.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in m.graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    token_led = [n for n in m.graph.node if n.op_type == "Reshape" and n.input[1] in consts
                 and consts[n.input[1]].size and int(consts[n.input[1]].ravel()[0]) == 16]
    assert token_led  # the graph does reshape with the 16 tokens leading
    assert "Reshape" in check_onnx_for_tensorrt(path, precision=Precision.FP32, recipe=recipe)["ops"]
    # the same graph with one of those reshapes pinning the batch to 2 is refused, naming the node
    node = token_led[0]
    pinned = np.array([16 if v == 16 else (2 if v == -1 else v) for v in consts[node.input[1]].ravel()], np.int64)
    m.graph.initializer.append(onnx.numpy_helper.from_array(pinned, "pinned_shape"))
    node.input[1] = "pinned_shape"
    bad = tmp_path / "pinned.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(BuildError, match=rf"Reshape node {node.name!r}: reshapes to the fixed shape \[16, 2"):
        check_onnx_for_tensorrt(bad, precision=Precision.FP32, recipe=recipe)
