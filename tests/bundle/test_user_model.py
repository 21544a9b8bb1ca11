"""A second, non-image user model (wine MLP via python: factories) through build for onnx and openvino."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecore.bundle import open_bundle
from targets import load_runner
from tests.fixtures.pipeline import tiny_config
from toolchain.bundle import build_bundle


@pytest.fixture(scope="module")
def wine_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from toolchain import pipeline

    run_dir = tmp_path_factory.mktemp("wine") / "run"
    cfg = tiny_config(
        run_dir,
        run={"name": "wine-mlp"},
        data={"source": "python:tests.bundle.user_factories:wine", "batch_size": 16},
        teacher={"family": "python:tests.bundle.user_factories:wine_mlp"},
        train={"epochs": 8, "augment": False, "lr": 0.01, "patience": 8},
        prune={"ratio": 2.0, "target": "params"},
        distill={"epochs": 4, "patience": 4},
    )
    pipeline.run_all(cfg, run_dir, show=False)
    return run_dir


@pytest.mark.parametrize(("target", "precision"), [("onnx", "fp32"), ("onnx", "int8"), ("openvino", "fp32"),
                                                   ("openvino", "int8")])
def test_wine_bundles(wine_run: Path, tmp_path: Path, target: str, precision: str) -> None:
    out = tmp_path / f"{target}-{precision}"
    rep = build_bundle(run_dir=wine_run, target=target, precision=precision, out=out)
    b = open_bundle(out)
    m = b.manifest.to_dict()
    assert m["model"]["name"] == "wine-mlp"
    assert m["input"]["layout"] == "NF" and m["input"]["shape"] == [None, 13]
    assert m["output"]["labels"] == ["class_0", "class_1", "class_2"]
    assert rep["verify"]["status"] == "passed"
    assert m["metrics"]["accuracy"] >= m["metrics"]["reference_accuracy"] - 0.01
    if precision == "fp32":
        assert m["metrics"]["agreement"] >= 0.995
    # the agent path: raw features in, logits out
    from toolchain.rundir import RunDir

    s = RunDir(wine_run).splits()
    logits = load_runner(b).run(b.input_spec.preprocess(s.test[0]))
    assert logits.shape == (len(s.test[1]), 3)
