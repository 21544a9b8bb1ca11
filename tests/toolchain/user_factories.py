"""User factories for the ``python:module:function`` data and model sources (tests)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def tabular():
    """A 3-class tabular problem: 12 features, separable by a few of them."""
    rng = np.random.default_rng(0)
    n = 360
    y = np.repeat(np.arange(3), n // 3)
    X = rng.normal(size=(n, 12)).astype(np.float32) * 2.0 + 5.0
    X[:, 0] += y * 8.0
    X[:, 1] -= y * 6.0
    return {"X": X, "y": y, "labels": ["low", "mid", "high"]}


def tiny_mlp(*, input_shape, num_classes):
    import torch.nn as nn

    (f,) = input_shape
    return nn.Sequential(nn.Linear(f, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, num_classes))


def not_a_model(*, input_shape, num_classes):
    return "nope"


def broken_data():
    raise RuntimeError("database offline")


def bad_shape():
    return np.zeros((10, 2, 3)), np.zeros(10, dtype=np.int64)



class UserViT(nn.Module):
    """What a user writes: a small ViT on torch's nn.TransformerEncoder (pre-norm, GELU), 2x2 patches."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        c, h, w = input_shape
        self.embed = nn.Conv2d(c, dim, 2, stride=2)
        self.pos = nn.Parameter(torch.randn(1, (h // 2) * (w // 2), dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.encoder(t)).mean(1))


def user_vit(*, input_shape, num_classes):
    return UserViT(tuple(input_shape), num_classes)


class RigidAttention(nn.Module):
    """Attention with its widths written into the reshape and no head count to find."""

    def __init__(self, dim: int, tokens: int) -> None:
        super().__init__()
        self.dim, self.tokens = dim, tokens
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.tokens, 4, self.dim // 4).flatten(2)  # the embedding width written in too
        q, k, v = self.qkv(x).reshape(x.shape[0], self.tokens, 3, 4, self.dim // 4).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2), -1)
        return self.out((a @ v).transpose(1, 2).reshape(x.shape[0], self.tokens, self.dim))


class RigidNet(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, dim: int = 32) -> None:
        super().__init__()
        c, h, w = input_shape
        self.embed = nn.Conv2d(c, dim, 2, stride=2)
        self.attn = RigidAttention(dim, (h // 2) * (w // 2))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head((t + self.attn(t)).mean(1))


def rigid_attention_net(*, input_shape, num_classes):
    return RigidNet(tuple(input_shape), num_classes)
