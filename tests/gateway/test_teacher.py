"""The gateway's heavy model: the teacher as ONNX (onnxruntime) or PyTorch, from the shared tiny run."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_gateway.model import load_teacher
from edgecore.errors import GatewayError


def test_onnx_and_torch_teachers_agree(tiny_run):
    from toolchain.rundir import RunDir

    x, y = RunDir(tiny_run).splits().test
    spec = RunDir(tiny_run).splits().input_spec
    onnx_t = load_teacher(tiny_run, prefer="onnx", threads=1)
    torch_t = load_teacher(tiny_run, prefer="torch", threads=1)
    assert onnx_t.sample_shape == torch_t.sample_shape == spec.sample_shape
    assert len(onnx_t.labels) == len(torch_t.labels) > 1
    xb = spec.preprocess(x)
    a, b = onnx_t.run(xb), torch_t.run(xb)
    assert a.shape == b.shape == (len(x), len(onnx_t.labels))
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.99
    assert np.abs(a - b).max() < 1e-2
    with pytest.raises(GatewayError, match="no teacher"):
        load_teacher(tiny_run / "reports")
    with pytest.raises(GatewayError, match="choose onnx or torch"):
        load_teacher(tiny_run, prefer="tf")
