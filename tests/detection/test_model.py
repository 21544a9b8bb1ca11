"""The detector family: the raw output contract at any input size, ONNX export parity and decoding, pruning that
keeps the output whole, and a tiny teacher that learns the shapes set."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from edgecore.detect import decode
from edgecore.errors import ModelError
from toolchain.config import ModelConfig
from toolchain.detection.loss import detection_loss
from toolchain.detection.metrics import box_agreement, evaluate
from toolchain.detection.model import build_detector, detection_params
from toolchain.detection.shapes import generate
from toolchain.models import count_macs

TINY = ModelConfig(family="resnet", width=8, depth=1)


@pytest.fixture(autouse=True)
def one_thread():
    """The machine is shared: one intra-op thread is faster than two contending ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _busy(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics and class biases near 0: outputs with structure, and detections to decode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    torch.nn.init.normal_(model.head.cls_pred.bias, std=0.5, generator=g)
    torch.nn.init.normal_(model.head.cls_pred.weight, std=0.3, generator=g)
    torch.nn.init.normal_(model.head.box_pred.weight, std=0.3, generator=g)
    return model.eval()


@pytest.mark.parametrize("family", [TINY, ModelConfig(family="mobilenet", width=8, width_mult=1.0, depth_mult=0.5)],
                         ids=["resnet", "mobilenet"])
@pytest.mark.parametrize("hw", [(64, 64), (70, 45), (96, 96)])
def test_raw_output_follows_the_decode_contract(family, hw):
    model = build_detector(family, input_shape=(3, *hw), num_classes=3).eval()
    params = detection_params(model, hw)
    assert params.strides == (8, 16, 32) and params.num_classes == 3
    with torch.no_grad():
        raw = model(torch.randn(2, 3, *hw))
    assert raw.shape == (2, params.num_anchors, 7)
    assert float(raw[..., :4].min()) >= 0.0  # distances are non-negative in the graph
    # levels in increasing stride, row-major within each: raw[:, offset + i * W + j] is the head's (i, j) output
    maps: list[torch.Tensor] = []
    hook = model.head.register_forward_hook(lambda mod, args, out: maps.append(out))
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        raw = model(x)
    hook.remove()
    assert [tuple(m.shape[2:]) for m in maps] == list(params.level_shapes)
    offset = 0
    for m in maps:
        _, _, h, w = m.shape
        for i, j in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)):
            torch.testing.assert_close(raw[:, offset + i * w + j], m[:, :, i, j])
        offset += h * w
    assert offset == params.num_anchors


def test_width_and_depth_knobs_make_teacher_and_student():
    big = build_detector(ModelConfig(family="resnet", width=16, depth=2), input_shape=(3, 96, 96), num_classes=4)
    small = build_detector(ModelConfig(family="mobilenet", width=8, width_mult=1.0, depth_mult=0.5),
                           input_shape=(3, 96, 96), num_classes=4, head_convs=1)
    assert count_macs(small, (3, 96, 96)) * 5 < count_macs(big, (3, 96, 96))


def test_bad_configurations_fail_with_clear_errors():
    with pytest.raises(ModelError, match="'mlp' cannot be a detector backbone"):
        build_detector(ModelConfig(family="mlp"), input_shape=(3, 64, 64), num_classes=2)
    with pytest.raises(ModelError, match="needs image inputs"):
        build_detector(TINY, input_shape=(16,), num_classes=2)
    with pytest.raises(ModelError, match="activation 'gelu' unknown"):
        build_detector(TINY, input_shape=(3, 64, 64), num_classes=2, act="gelu")
    with pytest.raises(ModelError, match="is not a detector"):
        detection_params(torch.nn.Linear(2, 2), 64)


def test_onnx_export_matches_pytorch_and_decodes(tmp_path):
    import onnx

    from toolchain.export import export_onnx, ort_logits
    from toolchain.passes.qat import fold_batchnorm

    model = _busy(build_detector(TINY, input_shape=(3, 64, 64), num_classes=3, act="relu"))
    with torch.no_grad():
        shared = model(torch.ones(1, 3, 64, 64))
    assert fold_batchnorm(model)[1] == 0  # every BN folds, the head's into per-level copies of its convs
    with torch.no_grad():
        torch.testing.assert_close(model(torch.ones(1, 3, 64, 64)), shared, atol=1e-4, rtol=1e-4)
    path = tmp_path / "det.onnx"
    export_onnx(model, path, input_shape=(3, 64, 64), opset=18)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    ops = {n.op_type for n in graph.graph.node}
    assert ops <= {"Conv", "Relu", "Add", "Resize", "Concat", "Reshape", "Transpose", "Shape", "Slice", "Gather",
                   "Unsqueeze", "Constant", "Identity"}, ops
    assert "Resize" in ops
    assert not graph.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")  # dynamic batch

    x = np.random.default_rng(0).uniform(0, 1, (3, 3, 64, 64)).astype(np.float32)  # a batch of 3, exported with 2
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = ort_logits(path, x)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)

    params = detection_params(model, 64, score_threshold=0.3)
    ref_dets, got_dets = decode(ref, params), decode(got, params)
    assert sum(len(d) for d in ref_dets) > 10  # something to compare
    assert box_agreement(ref_dets, got_dets, iou=0.99) > 0.98
    moved = got.copy()
    moved[..., :4] += 0.1  # a tenth of a stride on every side: the comparison sees it
    assert box_agreement(ref_dets, decode(moved, params), iou=0.99) < 0.5


def test_pruning_keeps_the_raw_output_whole():
    import torch_pruning as tp

    from toolchain.passes.prune import make_pruner

    model = build_detector(ModelConfig(family="resnet", width=16, depth=1), input_shape=(3, 64, 64), num_classes=3)
    x = torch.zeros(1, 3, 64, 64)
    tp.DependencyGraph().build_dependency(model, example_inputs=x)
    before = count_macs(model, (3, 64, 64))
    make_pruner(model, input_shape=(3, 64, 64), ratio=0.5, steps=1, num_classes=3, importance="l2",
                max_ratio=0.9).step()
    assert count_macs(model, (3, 64, 64)) < 0.5 * before
    conv = model.head.cls_towers[0][0][0]
    assert conv.out_channels < 32  # the head was pruned, every level's BN with its shared conv ...
    assert all(model.head.cls_towers[lvl][0][0] is conv for lvl in range(3))
    assert all(model.head.cls_towers[lvl][0][1].num_features == conv.out_channels for lvl in range(3))
    assert model.head.box_pred.out_channels == 4 and model.head.cls_pred.out_channels == 3  # ... its outputs not
    with torch.no_grad():
        assert model.eval()(x).shape == (1, detection_params(model, 64).num_anchors, 7)

    # the protection is real: with no layer ignored, torch-pruning cuts the raw output's channels
    other = build_detector(ModelConfig(family="resnet", width=16, depth=1), input_shape=(3, 64, 64), num_classes=3)
    tp.pruner.MetaPruner(other, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                         ignored_layers=[]).step()
    with torch.no_grad():
        assert other.eval()(x).shape[-1] < 7


def test_the_pruner_ignores_the_layers_a_detector_names():
    from toolchain.passes.prune import _output_layers

    model = build_detector(TINY, input_shape=(3, 64, 64), num_classes=3)
    ignored = _output_layers(model, 3)
    assert any(m is model.head.box_pred for m in ignored)  # 4 outputs: only its own declaration names it
    assert sum(m is model.head.cls_pred for m in ignored) == 1  # found by its width and declared: listed once


def test_a_tiny_teacher_learns_the_shapes_set():
    torch.manual_seed(0)
    ds = generate(16, size=64, seed=1)
    x = torch.from_numpy(ds.images).float() / 255
    targets = list(zip(ds.boxes, ds.classes))
    model = build_detector(TINY, input_shape=(3, 64, 64), num_classes=ds.num_classes, head_convs=1)
    params = detection_params(model, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=1e-4)
    model.eval()
    with torch.no_grad():
        before = evaluate(decode(model(x).numpy(), params), ds)
    t0, losses = time.perf_counter(), []
    model.train()
    for _ in range(80):
        loss, _ = detection_loss(model(x), targets, params)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        after = evaluate(decode(model(x).numpy(), params), ds)
    assert before["map50"] < 0.05
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10])
    assert after["map50"] > 0.5, after
    assert after["map"] > 0.3, after
    assert seconds < 25
