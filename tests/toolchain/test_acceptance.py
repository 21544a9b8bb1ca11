"""Acceptance numbers of the pipeline issue, with the default toolchain.toml (slow).

teacher >= 98.5 % test accuracy; student >= 10x fewer MACs and >= teacher - 1.0 pt;
QDQ ONNX in ONNX Runtime >= student fp32 - 0.5 pt; train + compress + export < 10 min
on 2 CPU cores. Run with `make test-slow` or `pytest -m slow tests/toolchain`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from toolchain import pipeline
from toolchain.config import load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_default_config_meets_acceptance_numbers(tmp_path):
    cfg = load_config(REPO / "toolchain.toml")
    cfg = cfg.replace(run=dataclasses.replace(cfg.run, dir=tmp_path / "run"),
                      train=dataclasses.replace(cfg.train, progress=False))
    t0 = time.perf_counter()
    out = pipeline.run_all(cfg, tmp_path / "run", show=True)
    wall = time.perf_counter() - t0
    teacher = out["train"]["test_accuracy"]
    comp = out["compress"]
    exp = out["export"]
    student = exp["student_fp32_ort_accuracy"]
    qdq = exp["student_qdq_ort_accuracy"]
    summary = {"teacher": teacher, "student_fp32_ort": student, "qdq_ort": qdq,
               "macs_reduction": comp["prune"]["macs_reduction"], "qdq_weight_bits": exp["qdq_weight_bits"],
               "wall_s": round(wall, 1)}
    print("ACCEPTANCE", json.dumps(summary))
    assert teacher >= 0.985, summary
    assert comp["prune"]["macs_reduction"] >= 10.0, summary
    assert student >= teacher - 0.010 - 1e-9, summary
    assert qdq >= student - 0.005 - 1e-9, summary
    assert wall < 600, summary
