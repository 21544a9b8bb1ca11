"""The pipeline works for a non-image user model and data set (python: factories)."""

from __future__ import annotations

import json

import numpy as np

from tests.fixtures.pipeline import tiny_config
from toolchain import pipeline
from toolchain.export import ort_logits
from toolchain.rundir import RunDir


def test_tabular_user_data_and_user_model_end_to_end(tmp_path):
    run_dir = tmp_path / "tab"
    cfg = tiny_config(
        run_dir,
        data={"source": "python:tests.toolchain.user_factories:tabular", "batch_size": 32},
        teacher={"family": "python:tests.toolchain.user_factories:tiny_mlp"},
        train={"epochs": 6, "augment": True},
        prune={"ratio": 2.0, "target": "params"},
    )
    out = pipeline.run_all(cfg, run_dir, show=False)
    assert out["train"]["test_accuracy"] > 0.6
    run = RunDir(run_dir)
    spec = run.input_spec
    assert spec.layout == "NF" and spec.shape == (None, 12)
    assert out["compress"]["prune"]["params_reduction"] >= 2.0
    s = run.splits()
    X = spec.preprocess(s.test[0])
    np.testing.assert_allclose(
        ort_logits(run_dir / "student.onnx", X),
        run.load_student()(__import__("torch").from_numpy(X)).detach().numpy(), atol=1e-4, rtol=1e-4,
    )
    assert json.loads((run_dir / "data.json").read_text())["labels"] == ["low", "mid", "high"]
    assert run.model_source().onnx_qdq is not None
