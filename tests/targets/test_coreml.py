from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecore.errors import AccuracyGateError, BuildError
from edgecore.manifest import ArtifactInfo
from edgecore.spec import Precision
from targets import get_target
from targets.coreml_proxy import WeightCompression, quantize_like_coremltools
from targets.coreml_target import check_structure
from tests.targets.contract import TargetContract
from toolchain.verify import compare


class TestCoreMLContract(TargetContract):
    target_name = "coreml"

    def test_structure_of_int8_weights(self, target, tiny_source: Any, built, tmp_path_factory) -> None:
        out, art = self._build(target, Precision.INT8, tiny_source, built, tmp_path_factory)
        s = art.details["structure"]
        assert s["quantized_weights"] >= s["compute_ops"] > 0
        with pytest.raises(BuildError, match="input 'image' missing"):
            check_structure(out / art.main, input_name="image", sample_shape=(1, 8, 8), precision=Precision.INT8)

    def test_fp16_keeps_float_weights(self, target, tiny_source: Any, built, tmp_path_factory) -> None:
        out, art = self._build(target, Precision.FP16, tiny_source, built, tmp_path_factory)
        assert art.details["structure"]["quantized_weights"] == 0
        with pytest.raises(BuildError, match=r"only 0 of \d+ conv/linear weights are stored quantized"):
            check_structure(out / art.main, input_name="input", sample_shape=tiny_source.source.input_spec.sample_shape,
                            precision=Precision.INT8)  # float weights do not pass as int8


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS path")
def test_not_available_off_macos() -> None:
    ok, why = get_target("coreml").available()
    assert not ok and "macOS" in why


# ---------------------------------------------------------------------- proxy (Core ML predicts on macOS only)
def _info(art: Any) -> ArtifactInfo:
    return art.info()


@pytest.mark.parametrize("mode,dtype,granularity", [("linear_symmetric", "int8", "per_channel"),
                                                    ("linear_symmetric", "uint8", "per_tensor"),
                                                    ("linear", "int8", "per_channel")])
def test_quantizer_is_coremltools_own(mode: str, dtype: str, granularity: str) -> None:
    """The proxy's quantizer gives what coremltools' routine gives, to the bit, on fp16 conv and linear weights."""
    from coremltools.converters.mil.mil import types
    from coremltools.optimize._utils import compute_qparams_by_dtype

    rng = np.random.default_rng(0)
    c = WeightCompression(mode=mode, dtype=dtype, granularity=granularity)
    for shape in ((16, 8, 3, 3), (10, 32)):
        w = (rng.standard_normal(shape) * rng.uniform(0.01, 3, size=(shape[0],) + (1,) * (len(shape) - 1))).astype(np.float16)
        blocks = [1 if granularity == "per_channel" and a == 0 else 0 for a in range(w.ndim)]
        q, scale, zp = compute_qparams_by_dtype(w, types.string_to_builtin(dtype), mode.upper(), blocks)
        # dequantized as constexpr_affine_dequantize does: (q - zero point) * scale, scale in fp16
        theirs = (q.astype(np.float32) - (0 if zp is None else zp.astype(np.float32))) * scale
        np.testing.assert_array_equal(quantize_like_coremltools(w, c, channel_axis=0), theirs.astype(np.float16))


def _gate(art: Any, d: Path, src: Any, ts: Any, ref: np.ndarray | None = None) -> dict[str, Any]:
    """The build's own verify step (`toolchain.verify.evaluate`) on the package in ``d``; returns its verify block."""
    from toolchain.verify import evaluate

    return evaluate(get_target("coreml"), d, _info(art), src.input_spec, x_test=ts.x_test, y_test=ts.y_test,
                    ref_test=ts.ref_logits if ref is None else ref, precision=art.precision, budget_pt=1.0,
                    labels=src.labels, source=src).verify


def _corrupt(package: Path, old: np.ndarray, new: np.ndarray) -> None:
    """Overwrite the stored bytes of one weight tensor of the package (found by its bytes, exactly once)."""
    blob = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = blob.read_bytes()
    assert data.count(old.tobytes()) == 1, "the tensor's bytes are not unique in weight.bin"
    blob.write_bytes(data.replace(old.tobytes(), new.astype(old.dtype).tobytes()))


class TestCoreMLProxy:
    @pytest.fixture(scope="class")
    def builds(self, tiny_source: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
        t = get_target("coreml")
        ok, why = t.build_available()
        if not ok:
            pytest.skip(why)
        out = {}
        for p in (Precision.FP32, Precision.FP16, Precision.INT8):
            d = tmp_path_factory.mktemp(f"coreml-proxy-{p.value}")
            out[p.value] = (d, t.build(tiny_source.source, p, None, d))
        return out

    @pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
    def test_proxy_runs_the_package_and_passes(self, precision: str, builds: dict[str, Any], tiny_source: Any) -> None:
        d, art = builds[precision]
        proxy = get_target("coreml").proxy(d, _info(art), art.precision, tiny_source.source)
        assert not proxy.unverified and "the package's own ML program" in proxy.evaluates
        assert proxy.runtime.endswith("CPU fp32" if precision == "fp32" else "CPU fp16"), proxy.runtime
        if precision == "int8":
            assert f"{art.details['structure']['quantized_weights']} of them int8" in proxy.evaluates
        logits = proxy.runner.run(tiny_source.x_test)
        diff = float(np.abs(logits - tiny_source.ref_logits).max())
        assert diff < {"fp32": 1e-4, "fp16": 0.05, "int8": 0.5}[precision], diff  # the student's own program
        v = _gate(art, d, tiny_source.source, tiny_source)
        assert v["status"] == "proxy" and v["agreement"] >= 0.95, v

    @pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
    def test_a_corrupt_bias_in_the_package_fails_the_gate(self, precision: str, builds: dict[str, Any],
                                                          tiny_source: Any, tmp_path: Path) -> None:
        """One stored weight of the package changed (the classifier's bias of class 3): every answer becomes
        class 3. A proxy that evaluates the student instead of the package passes it."""
        import shutil

        from targets.coreml_mil import MilProgramRunner

        d0, art = builds[precision]
        shutil.copytree(d0 / art.main, tmp_path / art.main)
        bias = [w for name, w in MilProgramRunner(tmp_path / art.main).weights() if name.startswith("linear") and
                name.endswith(".bias")][-1]
        bad = bias.copy()
        bad[3] = 1000
        _corrupt(tmp_path / art.main, bias, bad)
        with pytest.raises(AccuracyGateError, match="below the PyTorch reference"):
            _gate(art, tmp_path, tiny_source.source, tiny_source)

    def test_a_corrupt_int8_weight_in_the_package_fails_the_gate(self, builds: dict[str, Any], tiny_source: Any,
                                                                 tmp_path: Path) -> None:
        """The int8 data of the first convolution negated: the package answers wrongly and the gate says so."""
        import shutil

        from targets.coreml_mil import load_program

        d0, art = builds["int8"]
        shutil.copytree(d0 / art.main, tmp_path / art.main)
        q = next(op.inputs["quantized_data"].val for op in load_program(tmp_path / art.main).functions["main"].operations
                 if op.op_type == "constexpr_affine_dequantize")
        _corrupt(tmp_path / art.main, q, -q)
        with pytest.raises(AccuracyGateError, match="below the PyTorch reference"):
            _gate(art, tmp_path, tiny_source.source, tiny_source)

    def test_a_program_it_cannot_run_is_unverified(self, tiny_source: Any, tmp_path: Path) -> None:
        """Softplus converts to a MIL op the interpreter does not execute: the proxy falls back to the student and
        the status says unverified, never proxy."""
        import torch

        model = torch.nn.Sequential(tiny_source.model, torch.nn.Softplus()).eval()
        with torch.no_grad():
            ref = model(torch.from_numpy(tiny_source.x_test)).numpy()
        src = dataclasses.replace(tiny_source.source, torch_model=lambda: model)
        art = get_target("coreml").build(src, Precision.FP16, None, tmp_path)
        v = _gate(art, tmp_path, src, tiny_source, ref)
        assert v["status"] == "unverified" and "softplus" in v["unverified"], v
        assert "not the package" in v["evaluates"]
        with pytest.raises(BuildError, match="no PyTorch student"):
            get_target("coreml").proxy(tmp_path, _info(art), art.precision, None)

    def test_broken_classifier_fails_the_proxy_gate(self, tiny_source: Any, tmp_path: Path) -> None:
        """A student whose classifier has one outlier weight (on a dead feature, so the float model is unhurt):
        per-channel int8 gives that class's row a degenerate scale, every other weight of it rounds to 0."""
        import copy

        import torch

        model = copy.deepcopy(tiny_source.model).eval()
        bn, fc = model[4], model[8]  # the last BatchNorm2d and the Linear classifier of the tiny CNN
        with torch.no_grad():
            bn.weight[0], bn.bias[0] = 0.0, -10.0  # feature 0 is dead after the ReLU
            fc.weight[3, 0] = 1e4
            ref = model(torch.from_numpy(tiny_source.x_test)).numpy()
        src = dataclasses.replace(tiny_source.source, torch_model=lambda: model)
        art = get_target("coreml").build(src, Precision.INT8, None, tmp_path)  # the real coremltools artifact
        proxy = get_target("coreml").proxy(tmp_path, _info(art), art.precision, src)  # runs that package
        res = compare(proxy.runner.run(tiny_source.x_test), ref, tiny_source.y_test, precision=Precision.INT8, budget_pt=1.0)
        assert res.gate_failed, res
        with pytest.raises(AccuracyGateError, match="below the PyTorch reference"):
            res.raise_if_failed("coreml int8 build")


def test_mlp_student_builds_for_coreml_int8_and_passes_its_proxy_gate(tmp_path: Path) -> None:
    """Linear + BatchNorm1d (the `mlp` family): coremltools keeps the BatchNorm beside the Linear (it folds it only
    into convolutions); the proxy that folded it failed every MLP build. The proxy now runs the package as built."""
    from tests.targets.conftest import make_tiny_source
    from toolchain.models import MLP

    if not get_target("coreml").build_available()[0]:
        pytest.skip(get_target("coreml").build_available()[1])
    ts = make_tiny_source(tmp_path, lambda: MLP(64, 10, hidden=(32, 16), dropout=0.1))
    out = tmp_path / "coreml-int8"
    out.mkdir()
    art = get_target("coreml").build(ts.source, Precision.INT8, None, out)
    assert art.details["structure"]["quantized_weights"] == 3
    v = _gate(art, out, ts.source, ts)
    assert v["status"] == "proxy" and v["within_budget"] and v["agreement"] >= 0.98, v


@pytest.mark.skipif(sys.platform == "darwin", reason="the filtered warnings are the ones expected off macOS")
def test_coremltools_import_warnings_expected_off_macos_are_not_shown() -> None:
    """Importing coremltools off macOS logged ~10 warnings per build (native proxies that cannot load there, a
    scikit-learn version check for a converter we do not use); only those are dropped."""
    import subprocess

    pytest.importorskip("coremltools")
    code = ("import logging; logging.basicConfig(level=logging.WARNING)\n"
            "import targets.coreml_target\n"
            "import coremltools as ct\n"
            "ct.models.MLModel  # (the lazily loaded parts too)\n"
            "logging.getLogger('coremltools').warning('Failed to load something else')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Failed to load _ML" not in r.stderr and "scikit-learn version" not in r.stderr, r.stderr[-2000:]
    assert "Failed to load something else" in r.stderr  # other warnings of coremltools still show



def test_coreml_builds_a_users_transformer_once_unfused_and_names_torch_attention_otherwise(tmp_path: Path) -> None:
    """nn.TransformerEncoder: coremltools takes neither its fused fast path nor torch's own attention code."""
    import torch

    from edgecore.spec import InputSpec
    from targets.base import ModelSource
    from tests.toolchain.user_factories import user_vit
    from toolchain.attention import unfuse

    target = get_target("coreml")
    ok, why = target.build_available()
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    raw = user_vit(input_shape=(1, 8, 8), num_classes=10).eval()
    spec = InputSpec(name="input", shape=(None, 1, 8, 8), layout="NCHW", scale=1.0, mean=(0.0,), std=(1.0,))

    def source(model: Any) -> ModelSource:
        return ModelSource(name="vit", input_spec=spec, labels=tuple("0123456789"), onnx_fp32=tmp_path / "unused.onnx",
                           torch_model=lambda: model)

    with pytest.raises(BuildError, match=r"layer 'encoder.layers.0.self_attn' is torch.nn.MultiheadAttention.*"
                                         r"build from the student `toolchain compress` writes"):
        target.build(source(raw), Precision.FP32, None, tmp_path / "raw")
    (tmp_path / "unfused").mkdir()
    art = target.build(source(unfuse(raw, torch.randn(2, 1, 8, 8))), Precision.FP32, None, tmp_path / "unfused")
    assert art.details["structure"]


def test_tracing_for_coreml_leaves_the_fused_fast_path(monkeypatch: Any) -> None:
    import torch

    from targets._torch_build import no_fused_attention
    from tests.toolchain.user_factories import user_vit

    model = user_vit(input_shape=(1, 8, 8), num_classes=10).eval()
    with torch.no_grad():
        fused = str(torch.jit.trace(model, torch.zeros(1, 1, 8, 8)).inlined_graph)
        with no_fused_attention():
            plain = str(torch.jit.trace(model, torch.zeros(1, 1, 8, 8)).inlined_graph)
    assert "_transformer_encoder_layer_fwd" in fused and "_transformer_encoder_layer_fwd" not in plain
    assert torch.backends.mha.get_fastpath_enabled()  # restored
