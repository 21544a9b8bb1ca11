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
from targets.coreml_proxy import WeightCompression, coreml_proxy, quantize_like_coremltools
from targets.coreml_target import check_structure
from toolchain.verify import compare
from tests.targets.contract import TargetContract


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


class TestCoreMLProxy:
    @pytest.fixture(scope="class")
    def builds(self, tiny_source: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
        t = get_target("coreml")
        ok, why = t.build_available()
        if not ok:
            pytest.skip(why)
        out = {}
        for p in (Precision.FP16, Precision.INT8):
            d = tmp_path_factory.mktemp(f"coreml-proxy-{p.value}")
            out[p.value] = (d, t.build(tiny_source.source, p, None, d))
        return out

    def test_proxy_has_the_artifacts_weights_and_passes(self, builds: dict[str, Any], tiny_source: Any) -> None:
        d, art = builds["int8"]
        assert art.details["compression"] == WeightCompression().to_dict()
        proxy = get_target("coreml").proxy(d, _info(art), art.precision, tiny_source.source)
        assert f"all {art.details['structure']['quantized_weights']} equal to the artifact's stored weights" in proxy.evaluates
        assert proxy.runtime.startswith("pytorch") and "float16" in proxy.runtime
        res = compare(proxy.runner.run(tiny_source.x_test), tiny_source.ref_logits, tiny_source.y_test,
                      precision=Precision.INT8, budget_pt=1.0)
        assert res.passed and res.agreement >= 0.95, res.problems

    def test_proxy_refuses_weights_it_does_not_reproduce(self, builds: dict[str, Any], tiny_source: Any) -> None:
        d, art = builds["int8"]
        other = WeightCompression(granularity="per_tensor")  # not what the artifact was built with
        with pytest.raises(BuildError, match="does not reproduce the artifact's weights"):
            coreml_proxy(tiny_source.model, Precision.INT8, other, package=d / art.main)

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
        proxy = get_target("coreml").proxy(tmp_path, _info(art), art.precision, src)  # its weights match the artifact's
        res = compare(proxy.runner.run(tiny_source.x_test), ref, tiny_source.y_test, precision=Precision.INT8, budget_pt=1.0)
        assert res.gate_failed, res
        with pytest.raises(AccuracyGateError, match="below the PyTorch reference"):
            res.raise_if_failed("coreml int8 build")


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
