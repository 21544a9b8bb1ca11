"""The one-raw-input path for inputs the digits fixture does not have: three channels with a mean and std per
channel (NCHW, uint8 images), and feature vectors (NF). Each runtime's folded path against its batch path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgecore.confidence import confidence, row_scorer
from edgecore.spec import InputSpec, Precision
from targets import get_target, one_input
from targets.base import ModelSource

RGB = InputSpec("input", (None, 3, 12, 12), layout="NCHW", scale=1 / 255, mean=(0.485, 0.456, 0.406),
                std=(0.229, 0.224, 0.225))
FEATURES = InputSpec("input", (None, 6), layout="NF", scale=0.5, mean=(1.0, -2.0, 0.5, 0.0, 3.0, -1.0),
                     std=(1.0, 2.0, 0.5, 4.0, 1.5, 0.25))


def _source(spec: InputSpec, root: Path) -> tuple[ModelSource, np.ndarray]:
    """A small random model for ``spec``, exported to ONNX, and 200 raw inputs that span its range."""
    import torch
    from torch import nn

    torch.manual_seed(1)
    if spec.layout == "NCHW":
        # no pooling: every pixel moves the answer, so a wrong per-channel constant shows
        model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 5))
        rng = np.random.default_rng(2)
        tint = rng.uniform(0.1, 1.0, size=(200, 3, 1, 1))  # images of different colours and brightness
        raw = (rng.integers(0, 256, size=(200, *spec.sample_shape)) * tint).astype(np.uint8)
    else:
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5))
        raw = np.random.default_rng(2).normal(0, 3, size=(200, 6)).astype(np.float32)
    model.eval()
    onnx_path = root / "model.onnx"
    x0 = torch.from_numpy(spec.preprocess(raw[:1]))
    torch.onnx.export(model, (x0,), str(onnx_path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=18, dynamo=False)
    src = ModelSource(name="tiny", input_spec=spec, labels=tuple("abcde"), onnx_fp32=onnx_path,
                      torch_model=lambda: model)
    return src, raw


@pytest.mark.parametrize("spec", [RGB, FEATURES], ids=["rgb-uint8", "features"])
@pytest.mark.parametrize("target_name,precision", [("onnx", "fp32"), ("onnx", "int8"), ("openvino", "int8"),
                                                   ("tflite", "fp32"), ("tflite", "int8")])
def test_one_input_per_channel_constants(spec: InputSpec, target_name: str, precision: str, tmp_path: Path) -> None:
    from calibration.representative import build_representative_set

    target = get_target(target_name)
    for ok, why in (target.build_available(), target.available()):
        if not ok:
            pytest.skip(why)
    src, raw = _source(spec, tmp_path)
    p = Precision(precision)
    rep = None
    if p is Precision.INT8:
        rep = build_representative_set(inputs=spec.preprocess(raw), labels=np.zeros(len(raw), np.int64), n=100,
                                       path=tmp_path / "calibration.npz")
    (tmp_path / "out").mkdir()
    art = target.build(src, p, rep, tmp_path / "out")

    runner = target.load(tmp_path / "out", art.info(), spec, threads=1)
    ref = np.concatenate([np.asarray(runner.run(spec.preprocess(r[None]))) for r in raw[:40]])
    path = one_input(runner, spec)
    score = row_scorer("max_prob", 1.0, path.quant)
    got = [score(path.run(r)) for r in raw[:40]]
    tol = 0.02 if p is Precision.INT8 else 1e-4
    assert np.abs(np.array([c for _, c in got]) - confidence(ref)).max() <= tol
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 0.05 * (ref.max(1) - ref.min(1))  # not a near tie
    assert all(g[0] == int(t) for g, t, c in zip(got, ref.argmax(1), clear) if c) and clear.sum() >= 20
