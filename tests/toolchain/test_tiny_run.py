"""The shared ``tiny_run`` fixture holds everything the RunDir contract promises."""

from __future__ import annotations

import json

import numpy as np

from toolchain.rundir import RunDir


def test_tiny_run_layout(tiny_run):
    for name in ("config.toml", "data.json", "teacher.pt", "student.pt", "student_qat.pt", "teacher.onnx",
                 "student.onnx", "student_qdq.onnx", "reports/train.json", "reports/compress.json",
                 "reports/export.json"):
        assert (tiny_run / name).is_file(), name
    data = json.loads((tiny_run / "data.json").read_text())
    assert data["source"] == "digits" and data["labels"] == [str(i) for i in range(10)]
    assert sum(data["splits"].values()) == 1797


def test_rundir_api(tiny_run):
    run = RunDir(tiny_run)
    s = run.splits()
    assert s.train[0].dtype == np.float32 and s.train[0].shape[1:] == (1, 8, 8)
    assert s.test[1].dtype == np.int64 and s.train[0].max() == 16.0
    assert s.input_spec.shape == (None, 1, 8, 8) and s.input_spec.scale == 1 / 16
    # normalisation stats come from the train split
    x = s.input_spec.preprocess(s.train[0])
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1.0) < 1e-2
    src = run.model_source()
    assert src.onnx_fp32.name == "student.onnx" and src.onnx_qdq.name == "student_qdq.onnx"
    assert src.qdq_weight_bits in (7, 8) and src.labels == tuple(str(i) for i in range(10))
    student = src.torch_model()
    teacher = run.load_teacher()
    import torch

    with torch.no_grad():
        xt = torch.from_numpy(s.input_spec.preprocess(s.test[0][:5]))
        assert student(xt).shape == (5, 10) and teacher(xt).shape == (5, 10)
    lin = run.lineage()
    assert all(len(v) == 64 for v in lin.values())
