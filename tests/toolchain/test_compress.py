"""compress: pruning target search, unreachable targets, 7-bit weights, the stage table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgecore.errors import CompressionError
from toolchain.passes.prune import PruneTarget, find_pruning_ratio
from toolchain.passes.qat import QdqWeightBits, cpu_has_vnni, resolve_weight_bits
from toolchain.rundir import RunDir

NO_VNNI = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
VNNI = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n"


def test_vnni_detection_and_weight_bits():
    assert not cpu_has_vnni(NO_VNNI) and cpu_has_vnni(VNNI)
    assert cpu_has_vnni("flags : avx2 avx_vnni")
    assert resolve_weight_bits(QdqWeightBits.AUTO, cpuinfo=NO_VNNI) == 7
    assert resolve_weight_bits(QdqWeightBits.AUTO, cpuinfo=VNNI) == 8
    assert resolve_weight_bits(QdqWeightBits.SEVEN, cpuinfo=VNNI) == 7
    assert resolve_weight_bits(QdqWeightBits.EIGHT, cpuinfo=NO_VNNI) == 8


def test_pruning_ratio_search_and_unreachable_target(tiny_run):
    teacher = RunDir(tiny_run).load_teacher()
    from toolchain.models import count_macs, count_params

    base = count_macs(teacher, (1, 8, 8))
    ratio, size = find_pruning_ratio(teacher, input_shape=(1, 8, 8), num_classes=10, target=PruneTarget.MACS,
                                     goal=4.0, importance="l2", max_ratio=0.9)
    assert 0 < ratio < 0.9 and size <= base / 4.0
    with pytest.raises(CompressionError, match="pruning target unreachable: 1000x fewer params"):
        find_pruning_ratio(teacher, input_shape=(1, 8, 8), num_classes=10, target=PruneTarget.PARAMS,
                           goal=1000.0, importance="l2", max_ratio=0.9)
    assert count_params(teacher) > 0


def test_pruning_rounds_channel_counts(tiny_run):
    """prune.round_to: every pruned layer keeps a multiple of N channels (the logits layer is never pruned), and
    the ratio search still reaches its goal with the rounding."""
    import copy

    import torch

    from toolchain.models import count_macs
    from toolchain.passes.prune import make_pruner

    teacher = RunDir(tiny_run).load_teacher()
    base = count_macs(teacher, (1, 8, 8))
    for round_to in (1, 4):  # the tiny teacher has 8/16/32 channels
        ratio, size = find_pruning_ratio(teacher, input_shape=(1, 8, 8), num_classes=10, target=PruneTarget.MACS,
                                         goal=3.0, importance="l2", max_ratio=0.9, round_to=round_to)
        assert size <= base / 3.0
        model = copy.deepcopy(teacher)
        make_pruner(model, input_shape=(1, 8, 8), ratio=ratio, steps=2, num_classes=10, importance="l2",
                    max_ratio=0.9, round_to=round_to).step()
        channels = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        before = [m.out_channels for m in teacher.modules() if isinstance(m, torch.nn.Conv2d)]
        assert channels != before  # pruned
        if round_to == 4:
            assert all(c % 4 == 0 for c in channels), channels
        else:
            unrounded = channels
    assert any(c % 4 for c in unrounded), f"unrounded, the tiny teacher prunes to multiples of 4 anyway: {unrounded}"


def test_compress_report_and_student(tiny_run):
    rep = json.loads((tiny_run / "reports/compress.json").read_text())
    stages = [s["stage"] for s in rep["stages"]]
    assert stages == ["teacher", "pruned", "distilled", "qat"]
    for s in rep["stages"]:
        assert {"params", "macs", "size_bytes", "test_accuracy"} <= set(s)
    assert rep["prune"]["macs_reduction"] >= 3.0  # tiny_config asks for 3x
    assert rep["qdq_weight_bits"] in (7, 8)
    assert rep["stages"][2]["macs"] < rep["stages"][0]["macs"]
    student = RunDir(tiny_run).load_student()
    from toolchain.models import count_macs

    assert count_macs(student, (1, 8, 8)) == rep["stages"][2]["macs"]


def test_seven_bit_quantizer_keeps_weights_within_63(tmp_path):
    """The reduced-range recipe for CPUs without VNNI: every int8 weight in [-63, 63]."""
    import torch
    import torchao.quantization.pt2e as pt2e
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    from toolchain.export import _qdq_stats, export_onnx
    from toolchain.passes.qat import batch_dim, make_quantizer

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3))
    x = torch.randn(8, 1, 8, 8)
    g = torch.export.export(model, (x,), dynamic_shapes=({0: batch_dim()},)).module()
    p = prepare_qat_pt2e(g, make_quantizer(7))
    p(x)
    pt2e.move_exported_model_to_eval(p)
    c = convert_pt2e(p)
    export_onnx(c, tmp_path / "q.onnx", input_shape=(1, 8, 8), opset=18)
    stats = _qdq_stats(tmp_path / "q.onnx")
    assert stats["quantize_nodes"] > 0 and 0 < stats["max_abs_int8_weight"] <= 63
    from toolchain.export import ort_logits

    out = ort_logits(tmp_path / "q.onnx", x.numpy())
    assert out.shape == (8, 3) and np.isfinite(out).all()
