from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgecore.bundle import open_bundle
from edgecore.errors import BenchError
from edgecore.spec import InputSpec, Precision
from hw_bench.vendor import (
    benchmark_app_command,
    find_tool,
    parse_benchmark_app,
    trtexec_status,
)
from targets import load_runner
from targets.base import ModelSource

from .tinybundle import tiny_onnx

BAPP_OUT = """[ INFO ] Count:            151278 iterations
[ INFO ] Latency:
[ INFO ]    Median:        8.46 us
[ INFO ]    Average:       8.71 us
[ INFO ] Throughput:   75638.38 FPS"""


def test_parse_benchmark_app_units() -> None:
    assert parse_benchmark_app(BAPP_OUT) == {"median_ms": pytest.approx(0.00846), "throughput_sps": 75638.38}
    ms = BAPP_OUT.replace("8.46 us", "12.5 ms")
    assert parse_benchmark_app(ms)["median_ms"] == 12.5
    with pytest.raises(BenchError, match="no median"):
        parse_benchmark_app("crashed")


def test_trtexec_absent_is_said() -> None:
    t = trtexec_status()
    if not t["available"]:
        assert "trtexec not found" in t["reason"]


def _openvino_bundle(root: Path) -> Path:
    from hw_bench.models import _write_bundle
    from targets import get_target

    target = get_target("openvino")
    ok, why = target.build_available()
    if not ok:
        pytest.skip(f"openvino target cannot build here: {why}")
    root.mkdir(parents=True)
    tiny_onnx(root / "src.onnx")
    spec = InputSpec("input", (None, 1, 8, 8), scale=1 / 16)
    source = ModelSource(name="tiny", input_spec=spec, labels=tuple(str(i) for i in range(10)), onnx_fp32=root / "src.onnx")
    bdir = root / "bundle"
    bdir.mkdir()
    art = target.build(source, Precision.FP32, None, bdir)
    _write_bundle(bdir, artifact=art, source=source, calibration=None, metrics={})
    return bdir


def test_benchmark_app_cross_check_on_the_same_ir(tmp_path: Path) -> None:
    if find_tool("benchmark_app") is None:
        pytest.skip("benchmark_app not installed (pip install openvino)")
    from hw_bench.vendor import cross_check_openvino

    b = open_bundle(_openvino_bundle(tmp_path / "ov"))
    cmd = benchmark_app_command(b, threads=1, seconds=1, exe="benchmark_app")
    assert cmd[cmd.index("-nthreads") + 1] == "1" and cmd[cmd.index("-infer_precision") + 1] == "f32"
    assert "-api" in cmd and cmd[cmd.index("-api") + 1] == "sync" and cmd[cmd.index("-data_shape") + 1] == "input[1,1,8,8]"
    runner = load_runner(b, threads=1)
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    c = cross_check_openvino(b, runner.run, x, threads=1, seconds=1, rounds=1)
    assert c["available"] and c["median_ms"] > 0 and c["ours_median_ms"] > 0
    assert c["latency_ratio"] == pytest.approx(c["ours_median_ms"] / c["median_ms"])


def test_models_built_with_the_toolchain_for_onnx(tmp_path: Path) -> None:
    from hw_bench.models import build_bench_models

    out = build_bench_models(out_dir=tmp_path / "m", families=["mobilenet"], targets=["onnx"], size=32)
    names = sorted(p.name for p in out["bundles"])
    assert names == ["onnx-fp32", "onnx-int8"]
    fp32 = open_bundle(tmp_path / "m" / "mobilenet32" / "bundles" / "onnx-fp32")
    assert fp32.manifest.metrics["agreement"] == 1.0  # fp32 ONNX == PyTorch
    assert fp32.input_spec.sample_shape == (3, 32, 32)
    assert (tmp_path / "m" / "mobilenet32" / "model.pt").exists()
    with pytest.raises(BenchError, match="unknown benchmark families"):
        build_bench_models(out_dir=tmp_path / "x", families=["vgg"], targets=["onnx"], size=32)


def test_a_vit_tiny_class_model_for_onnx(tmp_path: Path) -> None:
    """``--families vit``: ViT-Ti/16's shape (about 1.1 GMACs of linear layers at 224), built like the others."""
    from hw_bench.models import FAMILIES, NUM_CLASSES, build_bench_models
    from toolchain.config import ModelConfig
    from toolchain.models import build_model, count_macs, count_params

    big = build_model(ModelConfig(**FAMILIES["vit"]), input_shape=(3, 224, 224), num_classes=NUM_CLASSES)
    assert big.pos_embed.shape[1] == 197 and len(big.blocks) == 12 and big.blocks[0].attn.num_heads == 3
    assert 5.5e6 < count_params(big) < 6.0e6  # DeiT-tiny: 5.7M
    assert 1.0e9 < count_macs(big, (3, 224, 224)) < 1.4e9
    out = build_bench_models(out_dir=tmp_path / "m", families=["vit"], targets=["onnx"], size=32)
    assert sorted(p.name for p in out["bundles"]) == ["onnx-fp32", "onnx-int8"]
    fp32 = open_bundle(tmp_path / "m" / "vit32" / "bundles" / "onnx-fp32")
    assert fp32.manifest.metrics["agreement"] == 1.0
