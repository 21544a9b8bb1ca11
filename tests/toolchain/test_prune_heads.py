"""Pruning transformers by whole heads and MLP width (torch-pruning with the heads it is told about)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgecore.errors import CompressionError
from toolchain.attention import UnfusedMultiheadAttention, head_layers, unfuse
from toolchain.models import ViT, count_macs
from toolchain.passes.prune import PruneTarget, find_pruning_ratio, make_pruner

SHAPE = (1, 8, 8)


class UserViT(nn.Module):
    """What users write: nn.TransformerEncoder, pre-norm, GELU, batch first."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 2, stride=2)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.1, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.embed(x).flatten(2).transpose(1, 2) + self.pos).mean(1))


class HandAttention(nn.Module):
    """Hand-written attention: q/k/v projections, a head count it reads at every call."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.n_heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def split(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.q_proj(x)), self.split(self.k_proj(x)), self.split(self.v_proj(x))
        a = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
        return self.out((a @ v).transpose(1, 2).flatten(2))


class RigidAttention(nn.Module):
    """Attention with no head count to find and its widths written into the reshape."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 16, 4, 8).flatten(2)  # the embedding width written in too
        q, k, v = self.qkv(x).reshape(x.shape[0], 16, 3, 4, 8).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2), -1)
        return self.out((a @ v).transpose(1, 2).reshape(x.shape[0], 16, 32))


class TokenNet(nn.Module):
    def __init__(self, attention: nn.Module, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 2, stride=2)
        self.attn = attention
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t)
        return self.head((t + self.mlp(t)).mean(1))


def vit(heads: int = 4) -> ViT:
    return ViT(SHAPE, 10, width=32, depth=2, heads=heads, patch=0, mlp_ratio=2, pool="cls", dropout=0.0)


def prune(model: nn.Module, ratio: float, steps: int) -> nn.Module:
    p = make_pruner(model, input_shape=SHAPE, ratio=ratio, steps=steps, num_classes=10, importance="l2",
                    max_ratio=0.95)
    for _ in range(steps):
        p.step()
    return model


def heads(model: nn.Module) -> list[tuple[int, int]]:
    """(heads, q width) per attention layer."""
    return [(getattr(m, "num_heads", getattr(m, "n_heads", 0)), q.out_features) for m, (q, _, _) in
            head_layers(model).items()]


def test_vit_loses_whole_heads_and_mlp_width():
    m = vit()
    before = count_macs(m, SHAPE)
    prune(m, 0.5, 2)
    assert heads(m) == [(2, 16), (2, 16)]  # two of four heads gone, each head still 8 wide
    assert all(b.attn.head_dim == 8 for b in m.blocks)
    assert m.blocks[0].fc1.out_features == 32 and m.blocks[0].fc1.in_features == 16  # MLP and embedding halved
    assert m(torch.randn(2, *SHAPE)).shape == (2, 10)
    assert count_macs(m, SHAPE) < before / 3


def test_whole_heads_are_chosen_by_importance():
    m = vit()
    attn = m.blocks[0].attn
    with torch.no_grad():  # head 2 of the first block carries almost nothing
        for lin in (attn.q, attn.k, attn.v):
            lin.weight[16:24] *= 1e-3
    prune(m, 0.25, 1)
    assert m.blocks[0].attn.num_heads == 3
    w = m.blocks[0].attn.q.weight  # three heads of 8 rows kept
    assert w.shape[0] == 24
    assert w.norm(dim=1).min() > 1e-2  # the weak head is the one removed


def test_head_schedule_never_removes_the_last_head():
    # torch-pruning's own iterative schedule takes 4 heads to 0 in four steps at ratio 0.95
    m = prune(vit(), 0.95, 4)
    assert [h for h, _ in heads(m)] == [1, 1]
    assert m(torch.randn(2, *SHAPE)).shape == (2, 10)
    m = prune(vit(), 0.5, 4)
    assert [h for h, _ in heads(m)] == [2, 2]


def test_users_transformer_encoder_is_unfused_and_pruned_by_heads():
    user = UserViT().eval()
    x = torch.randn(3, *SHAPE)
    plain = unfuse(user, x)
    assert not any(isinstance(m, (nn.TransformerEncoderLayer, nn.MultiheadAttention)) for m in plain.modules())
    assert isinstance(plain.enc.layers[0].self_attn, UnfusedMultiheadAttention)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), user(x), atol=1e-5, rtol=1e-5)
    before = count_macs(plain, SHAPE)
    prune(plain, 0.5, 2)
    assert heads(plain) == [(2, 16), (2, 16)]
    assert plain.enc.layers[0].linear1.out_features == 32
    assert count_macs(plain, SHAPE) < before / 3
    assert plain(x).shape == (3, 10)


def test_unfused_attention_matches_torch_with_masks_and_weights():
    mha = nn.MultiheadAttention(16, 4, batch_first=False).eval()
    ours = UnfusedMultiheadAttention.from_torch(mha, "mha").eval()
    q = torch.randn(5, 2, 16)
    kpm = torch.tensor([[False] * 4 + [True], [False] * 5])
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    with torch.no_grad():
        want, w_want = mha(q, q, q, key_padding_mask=kpm, attn_mask=causal)
        got, w_got = ours(q, q, q, key_padding_mask=kpm, attn_mask=causal)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_got, w_want, atol=1e-5, rtol=1e-5)


def test_hand_written_attention_with_a_head_count():
    m = TokenNet(HandAttention(32, 4))
    prune(m, 0.5, 1)
    assert m.attn.n_heads == 2 and m.attn.q_proj.out_features == 16
    assert m(torch.randn(2, *SHAPE)).shape == (2, 10)


def test_attention_the_pruner_cannot_read_is_one_clear_error():
    m = TokenNet(RigidAttention(32))
    with pytest.raises(CompressionError, match=r"attention layer 'attn' \(RigidAttention: no head count found\).*"
                                               r"leave \"prune\" out of compress.passes"):
        prune(m, 0.5, 1)


def test_a_vit_reaches_a_3x_macs_goal():
    m = vit()
    ratio, size = find_pruning_ratio(copy.deepcopy(m), input_shape=SHAPE, num_classes=10, target=PruneTarget.MACS,
                                     goal=3.0, importance="l2", max_ratio=0.95)
    assert 0 < ratio < 0.95 and size <= count_macs(m, SHAPE) / 3


def test_the_prune_report_lists_heads_before_and_after():
    from toolchain.passes.prune import attention_report

    m = vit()
    pruned = prune(copy.deepcopy(m), 0.5, 2)
    assert attention_report(m, pruned) == [{"layer": f"blocks.{i}.attn", "heads": [4, 2], "head_dim": [8, 8]}
                                           for i in range(2)]
    assert attention_report(TokenNet(RigidAttention(32)), TokenNet(RigidAttention(32))) == []
