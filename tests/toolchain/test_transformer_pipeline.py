"""Transformers through every stage: trained with their recipe, pruned by heads, distilled, quantized, exported."""

from __future__ import annotations

import json

import torch
from torch import nn

from toolchain import pipeline
from toolchain.config import load_config
from toolchain.rundir import RunDir


def test_tiny_vit_run_prunes_heads_and_exports(tiny_vit_run):
    rep = json.loads((tiny_vit_run / "reports" / "compress.json").read_text())
    assert rep["recipe"]["name"] == "transformer"
    (att,) = rep["prune"]["attention"]
    assert att["heads"][0] == 4 and 1 <= att["heads"][1] < 4 and att["head_dim"] == [4, 4]  # whole heads removed
    assert rep["macs_reduction"] >= 2.0
    exp = json.loads((tiny_vit_run / "reports" / "export.json").read_text())
    assert exp["models"]["student"]["max_abs_logit_diff"] < 1e-3
    assert exp["models"]["student_qdq"]["agreement"] >= 0.9
    student = RunDir(tiny_vit_run).load_student()
    assert student.blocks[0].attn.num_heads == att["heads"][1] and student(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_a_users_transformer_encoder_compresses_with_the_default_passes_order(tmp_path):
    """The reported crash: torch's encoder layers pruned on the embedding without regard to heads."""
    cfg = load_config(None, overrides=[
        'teacher.family="python:tests.toolchain.user_factories:user_vit"', "train.epochs=1", "train.progress=false",
        'compress.passes=["prune"]', 'compress.control="none"', "prune.ratio=2.0", "prune.steps=1",
        "prune.finetune_epochs=1"])
    pipeline.train(cfg, tmp_path / "run")
    rep = pipeline.compress(cfg, tmp_path / "run", show=False)
    assert rep["recipe"]["name"] == "transformer"
    heads = rep["prune"]["attention"]
    assert len(heads) == 2 and all(a["heads"][0] == 4 and a["heads"][1] < 4 and a["head_dim"] == [8, 8] for a in heads)
    assert rep["macs_reduction"] >= 2.0
    student = RunDir(tmp_path / "run").load_student()
    assert not any(isinstance(m, (nn.TransformerEncoderLayer, nn.MultiheadAttention)) for m in student.modules())


def test_a_latency_budget_prunes_a_vit_by_heads(tiny_vit_run, tmp_path):
    import shutil

    from tests.fixtures.pipeline import tiny_vit_config

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_vit_run, run_dir)
    cfg = tiny_vit_config(run_dir, prune={"target": "latency", "latency_budget_ms": 1e4, "latency_target": "onnx-fp32",
                                          "finetune_epochs": 1, "latency_step": 0.5, "latency_max_candidates": 1,
                                          "latency_extra_steps": 1, "latency_rounds": 1},
                          compress={"passes": ["prune"], "control": "none"})
    rep = pipeline.compress(cfg, run_dir, show=False)
    cands = rep["prune"]["latency"]["candidates"]
    assert [c["step"] for c in cands] == [0, 1] and cands[1]["macs"] < cands[0]["macs"]
    assert "attention" in rep["prune"]
