"""MiniLM-style distillation: a narrower transformer student imitates the teacher's attention relations."""

from __future__ import annotations

import pytest
import torch

from edgecore.errors import CompressionError
from toolchain.attention import RelationTap, relation_loss
from toolchain.config import load_config
from toolchain.models import ViT
from toolchain.passes.base import PassContext
from toolchain.passes.distill import DistillPass

SHAPE = (1, 8, 8)


def vit(width: int, heads: int) -> ViT:
    return ViT(SHAPE, 3, width=width, depth=1, heads=heads, patch=0, mlp_ratio=2, pool="mean", dropout=0.0)


def test_relation_loss_compares_two_widths_and_is_zero_for_a_copy():
    torch.manual_seed(0)
    t, s = vit(32, 4), vit(16, 2)
    ta, sa = RelationTap(t, "teacher"), RelationTap(s, "student")
    x = torch.randn(4, *SHAPE)
    t(x), s(x)
    assert ta.out["q"].shape[-1] == 32 and sa.out["q"].shape[-1] == 16
    loss = relation_loss(ta.out, sa.out, 2)
    assert loss > 0
    loss.backward()
    assert s.blocks[0].attn.q.weight.grad is not None and s.blocks[0].attn.q.weight.grad.abs().sum() > 0
    assert t.blocks[0].attn.q.weight.grad is None  # the teacher is only read
    assert float(relation_loss(ta.out, {k: v.detach() for k, v in ta.out.items()}, 4)) == pytest.approx(0, abs=1e-6)
    kept = ta.out["q"]
    ta.close(), sa.close()
    t(torch.randn(4, *SHAPE))
    assert ta.out["q"] is kept  # a closed tap no longer records


def test_distill_with_hidden_weight_pulls_the_relations_together():
    torch.manual_seed(0)
    teacher, student = vit(32, 4).eval(), vit(16, 2)
    with torch.no_grad():  # a trained teacher attends sharply; freshly initialised projections barely attend
        for lin in (teacher.blocks[0].attn.q, teacher.blocks[0].attn.k, teacher.blocks[0].attn.v):
            lin.weight *= 30
    x = torch.randn(96, *SHAPE)
    y = teacher(x).argmax(1).detach()
    cfg = load_config(None, overrides=["distill.epochs=20", "distill.hidden_weight=5.0", "train.progress=false",
                                       "distill.lr=0.01", "distill.patience=20", "data.batch_size=32"])
    ctx = PassContext(cfg=cfg, teacher=teacher, train=(x, y), val=(x, y), test=(x, y), input_shape=SHAPE,
                      num_classes=3, augment=False)

    def gap(model: torch.nn.Module) -> float:
        ta, sa = RelationTap(teacher, "teacher"), RelationTap(model, "student")
        with torch.no_grad():
            teacher(x), model(x)
            value = float(relation_loss(ta.out, sa.out, 2))
        ta.close(), sa.close()
        return value

    before = gap(student)
    with_rel = DistillPass(cfg)._run_for_config(student, cfg.distill, ctx)
    plain_cfg = load_config(None, overrides=["distill.epochs=20", "train.progress=false", "distill.lr=0.01",
                                             "distill.patience=20", "data.batch_size=32"])
    plain = DistillPass(plain_cfg)._run_for_config(student, plain_cfg.distill, ctx)
    assert with_rel.summary["relation_heads"] == 2 and with_rel.summary["hidden_weight"] == 5.0
    assert gap(with_rel.model) < 0.7 * before
    assert gap(with_rel.model) < gap(plain.model)
    assert not teacher.blocks[0].attn.q._forward_hooks  # the taps are removed after the pass


def test_hidden_weight_without_attention_is_one_clear_error():
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    cfg = load_config(None, overrides=["distill.epochs=1", "distill.hidden_weight=1.0", "train.progress=false"])
    x = torch.randn(8, *SHAPE)
    ctx = PassContext(cfg=cfg, teacher=teacher, train=(x, torch.zeros(8, dtype=torch.long)),
                      val=(x, torch.zeros(8, dtype=torch.long)), test=(x, torch.zeros(8, dtype=torch.long)),
                      input_shape=SHAPE, num_classes=3, augment=False)
    with pytest.raises(CompressionError, match=r"distill.hidden_weight: the teacher \(Sequential\) has no attention "
                                               r"layer.*set distill.hidden_weight = 0"):
        DistillPass(cfg)._run_for_config(vit(16, 2), cfg.distill, ctx)
