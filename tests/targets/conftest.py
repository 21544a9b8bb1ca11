"""A tiny digits CNN exported to ONNX (+ a QDQ variant): what target contract tests build from.

Independent of the pipeline so target tests stay fast (a few seconds to train)
and isolate the targets from training changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from calibration.representative import RepresentativeSet, build_representative_set
from edgecore.spec import InputSpec
from targets.base import ModelSource


@dataclass
class TinySource:
    source: ModelSource  # fp32 ONNX only (int8 goes through post-training quantization)
    qdq_source: ModelSource  # with a QDQ graph, as the QAT student provides
    rep: RepresentativeSet
    x_test: np.ndarray  # normalised
    y_test: np.ndarray
    ref_logits: np.ndarray  # PyTorch fp32 on x_test
    model: object


def _tiny_cnn():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def make_tiny_source(root: Path, model_fn: Callable[[], Any] | None = None) -> TinySource:
    """Train ``model_fn()`` (default: the tiny CNN) on digits for a few epochs, export it and quantize it."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(0)
    d = load_digits()
    X = d.images.astype(np.float32)[:, None] / 16.0
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = float(xtr.mean()), float(xtr.std())
    spec = InputSpec(name="input", shape=(None, 1, 8, 8), layout="NCHW", scale=1.0, mean=(mean,), std=(std,))
    xtr_n, xte_n = spec.preprocess(xtr), spec.preprocess(xte)
    model = (model_fn or _tiny_cnn)()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tx, ty = torch.from_numpy(xtr_n), torch.from_numpy(ytr)
    for _ in range(6):
        model.train()
        perm = torch.randperm(len(tx))
        for i in range(0, len(tx), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(tx[idx]), ty[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(xte_n)).numpy()
    onnx_path = root / "student.onnx"
    torch.onnx.export(
        model, (torch.from_numpy(xte_n[:1]),), str(onnx_path), input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=18, dynamo=False,
    )
    rep = build_representative_set(inputs=xtr_n, labels=ytr, n=200, path=root / "calibration.npz")
    from targets.onnx_target import static_quantize_onnx

    qdq = root / "student_qdq.onnx"
    static_quantize_onnx(onnx_path, qdq, rep)
    labels = tuple(str(i) for i in range(10))
    src = ModelSource(name="tiny-digits", input_spec=spec, labels=labels, onnx_fp32=onnx_path, torch_model=lambda: model)
    qsrc = ModelSource(name="tiny-digits", input_spec=spec, labels=labels, onnx_fp32=onnx_path, onnx_qdq=qdq,
                       torch_model=lambda: model, qdq_weight_bits=7)
    return TinySource(source=src, qdq_source=qsrc, rep=rep, x_test=xte_n, y_test=yte, ref_logits=ref, model=model)


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> TinySource:
    return make_tiny_source(tmp_path_factory.mktemp("tiny_source"))
