"""Model families: ResNet-style, MobileNet-style, MLP, ViT-style transformers, and user factories.

torchvision is not usable here, and its models assume 224x224 RGB anyway: these
families adapt their strides to any input size and channel count, so the same
code serves 8x8 digits and larger image folders. A family is a function
``(input_shape, num_classes, cfg) -> nn.Module``; a checkpoint records the
family and its config so it can be rebuilt.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from edgecore.errors import ModelError
from toolchain.config import ModelConfig


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU(inplace=False))
    return nn.Sequential(*layers)


def _stage_strides(hw: int, stages: int) -> list[int]:
    """Stride 2 per stage while the feature map stays at least 2 pixels wide."""
    strides, size = [], hw
    for i in range(stages):
        s = 2 if (i > 0 and size >= 4) else 1
        strides.append(s)
        size = math.ceil(size / s)
    return strides


def _stem_stride(hw: int) -> int:
    return 2 if hw >= 64 else 1


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = _conv_bn(cout, cout, 3, 1, act=False)
        self.shortcut = (
            nn.Identity() if stride == 1 and cin == cout else _conv_bn(cin, cout, 1, stride, act=False)
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet(nn.Module):
    """Three stages of basic blocks (width, 2*width, 4*width), global pool, linear head."""

    def __init__(self, in_ch: int, hw: int, num_classes: int, *, width: int, depth: int, dropout: float) -> None:
        super().__init__()
        self.stem = _conv_bn(in_ch, width, 3, _stem_stride(hw))
        hw = math.ceil(hw / _stem_stride(hw))
        blocks: list[nn.Module] = []
        cin = width
        for stage, stride in enumerate(_stage_strides(hw, 3)):
            cout = width * (2**stage)
            for b in range(depth):
                blocks.append(BasicBlock(cin, cout, stride if b == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(x))).flatten(1)
        return self.fc(self.drop(x))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, mid, 1))
        layers += [_conv_bn(mid, mid, 3, stride, groups=mid), _conv_bn(mid, cout, 1, act=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


def _make_divisible(v: float, divisor: int = 4) -> int:
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class MobileNet(nn.Module):
    """MobileNetV2-style: inverted residuals; width and depth multipliers scale it."""

    # (expansion, channels as a multiple of the base width, blocks)
    STAGES = ((1, 1, 1), (4, 1.5, 2), (4, 2, 2), (4, 4, 2))

    def __init__(
        self, in_ch: int, hw: int, num_classes: int, *, width: int, width_mult: float, depth_mult: float, dropout: float
    ) -> None:
        super().__init__()
        base = _make_divisible(width * width_mult)
        self.stem = _conv_bn(in_ch, base, 3, _stem_stride(hw))
        hw = math.ceil(hw / _stem_stride(hw))
        strides = _stage_strides(hw, len(self.STAGES))
        blocks: list[nn.Module] = []
        cin = base
        for (expand, mult, n), stride in zip(self.STAGES, strides):
            cout = _make_divisible(width * mult * width_mult)
            for b in range(max(1, round(n * depth_mult))):
                blocks.append(InvertedResidual(cin, cout, stride if b == 0 else 1, expand))
                cin = cout
        head = _make_divisible(cin * 2)
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(cin, head, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.head(self.blocks(self.stem(x)))).flatten(1)
        return self.fc(self.drop(x))


class MLP(nn.Module):
    """For feature vectors (layout NF); also accepts images by flattening them."""

    def __init__(self, in_features: int, num_classes: int, *, hidden: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        cin = in_features
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(dropout)]
            cin = h
        layers.append(nn.Linear(cin, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections and an explicit softmax.

    Separate projections are what structured pruning removes whole heads from (torch-pruning groups each
    projection's output channels by ``num_heads``); the explicit ``q @ k^T`` / softmax / ``@ v`` exports to plain
    MatMul and Softmax nodes, which every target converts (no fused attention operator). ``num_heads`` is read
    at every call, so a pruned copy only needs it updated (`toolchain.passes.prune` does).
    """

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.q = nn.Linear(dim, inner)
        self.k = nn.Linear(dim, inner)
        self.v = nn.Linear(dim, inner)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, d = self.num_heads, self.head_dim
        q = self.q(x).unflatten(-1, (h, d)).transpose(1, 2)  # (B, H, N, d)
        k = self.k(x).unflatten(-1, (h, d)).transpose(1, 2)
        v = self.v(x).unflatten(-1, (h, d)).transpose(1, 2)
        attn = torch.softmax((q * d**-0.5) @ k.transpose(-2, -1), dim=-1)
        return self.proj((attn @ v).transpose(1, 2).flatten(2))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` with a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, max(1, dim // heads))
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.fc2(self.act(self.fc1(self.norm2(x)))))


def vit_patch(input_shape: tuple[int, ...], patch: int) -> tuple[int, int]:
    """The patch stride (height, width): ``patch`` pixels square, or for a 1-D signal (H = 1) ``patch`` samples.

    ``patch = 0`` picks one: about 4 patches per side for images up to 16 pixels and 8 above (digits: 2x2,
    16 tokens), and signals cut into about 20 patches (MNIST-1D, 40 samples: 2 each).
    """
    _, h, w = input_shape
    if h == 1:
        return 1, patch or max(1, w // 20)
    side = min(h, w)
    return (patch, patch) if patch else ((max(1, side // 4),) * 2 if side <= 16 else (max(1, side // 8),) * 2)


class ViT(nn.Module):
    """Vision transformer: conv stem, patch embedding, learned positions, pre-norm blocks, mean or class-token pool.

    Small data sets (digits: about a thousand training images) are too few for a plain ViT's square patches: it
    reached 69% on digits where this one reaches 98%. So the patch embedding is a convolution whose kernel
    overlaps its neighbours (``2p - 1`` for stride ``p``), after one 3x3 convolution (half the width,
    BatchNorm, GELU): the early convolutions of Xiao et al. (NeurIPS 2021), a few per cent of the MACs. Images
    are cut into square patches; a 1-D signal (a (C, 1, L) input) along its length, so the same encoder serves
    both. ``width`` is the embedding size, ``depth`` the number of blocks, ``heads`` the attention heads
    (``width // heads`` wide each), ``mlp_ratio`` the MLP's hidden width over ``width``. ``stem = "patch"``
    is the original ViT's plain patchify (large images, where the overlapping kernel would cost too much).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, width: int, depth: int, heads: int,
                 patch: int, mlp_ratio: float, pool: str, dropout: float, stem: str = "conv") -> None:
        super().__init__()
        c, h, w = (int(d) for d in input_shape)
        ph, pw = vit_patch((c, h, w), patch)
        if ph > h or pw > w:
            raise ModelError(f"vit patch {ph}x{pw} is larger than the input {h}x{w} (lower teacher.patch)")
        if stem == "patch":  # the original ViT: non-overlapping patches, no convolution before them
            self.patch_embed: nn.Module = nn.Conv2d(c, width, (ph, pw), stride=(ph, pw))
            tokens = (h // ph) * (w // pw)
        else:
            k1 = (3 if h > 1 else 1, 3 if w > 1 else 1)
            kp = (2 * ph - 1, 2 * pw - 1)
            mid = max(1, width // 2)
            self.patch_embed = nn.Sequential(
                nn.Conv2d(c, mid, k1, padding=(k1[0] // 2, k1[1] // 2), bias=False), nn.BatchNorm2d(mid), nn.GELU(),
                nn.Conv2d(mid, width, kp, stride=(ph, pw), padding=(ph - 1, pw - 1)),
            )
            tokens = math.ceil(h / ph) * math.ceil(w / pw)
        self.pool = pool
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + (pool == "cls"), width) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(width, heads, max(1, round(width * mlp_ratio)), dropout)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        x = x[:, 0] if self.cls_token is not None else x.mean(1)
        return self.fc(self.drop(x))


class DomainGate(nn.Module):
    """Which model should answer an input: a small MLP on a pooled copy of it, one logit (high: the original data).

    Images are average-pooled to about 8x8 per channel (fixed kernels, so every exporter takes it), signals to
    about 64 steps; flat inputs are used as they are. ``toolchain refresh`` trains it to tell the run's original
    training inputs from the collected ones.
    """

    def __init__(self, sample_shape: tuple[int, ...], *, hidden: int = 32) -> None:
        super().__init__()
        shape = tuple(int(d) for d in sample_shape)
        if len(shape) == 3:
            c, h, w = shape
            k = (max(1, h // 8), max(1, w // 8))
            self.pool: nn.Module = nn.AvgPool2d(k, stride=k)
            features = c * (h // k[0]) * (w // k[1])
        elif len(shape) == 2:
            c, n = shape
            k1 = max(1, n // 64)
            self.pool = nn.AvgPool1d(k1, stride=k1)
            features = c * (n // k1)
        else:
            self.pool = nn.Identity()
            features = math.prod(shape)
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.flatten(self.pool(x), 1))))


class GatedExperts(nn.Module):
    """The production student kept for inputs like its training data, an expert for the shifted ones.

    ``logits = g * base(x) + (1 - g) * expert(x)`` with ``g = sigmoid(gate(x))``: one graph, so it quantizes and
    exports like any student. Made by ``toolchain refresh`` (``refresh.strategy = "expert"``): a refresh that
    overwrote the student would forget part of what it knew (docs/acceptance/issue13.md).
    """

    def __init__(self, base: nn.Module, expert: nn.Module, gate: nn.Module) -> None:
        super().__init__()
        self.base, self.expert, self.gate = base, expert, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(x))
        return g * self.base(x) + (1 - g) * self.expert(x)


def _image_dims(input_shape: tuple[int, ...], family: str) -> tuple[int, int]:
    if len(input_shape) != 3:
        raise ModelError(
            f"model family {family!r} needs image inputs (C, H, W); the data has shape {tuple(input_shape)} "
            "(use family 'mlp' for feature vectors)"
        )
    c, h, w = input_shape
    # a 1-D signal as a (C, 1, W) image: strides follow its length (a stride-2 conv keeps the single row)
    return int(c), int(min(h, w) if min(h, w) > 1 else max(h, w))


def build_model(cfg: ModelConfig, *, input_shape: tuple[int, ...], num_classes: int,
                what: str = "teacher.family") -> nn.Module:
    """``input_shape`` excludes the batch dimension; ``what`` names the config key in errors."""
    fam = cfg.family
    if fam == "resnet":
        c, hw = _image_dims(input_shape, fam)
        return ResNet(c, hw, num_classes, width=cfg.width, depth=cfg.depth, dropout=cfg.dropout)
    if fam == "mobilenet":
        c, hw = _image_dims(input_shape, fam)
        return MobileNet(
            c, hw, num_classes, width=cfg.width, width_mult=cfg.width_mult, depth_mult=cfg.depth_mult, dropout=cfg.dropout
        )
    if fam == "vit":
        if len(input_shape) != 3:
            raise ModelError(f"model family 'vit' needs image or signal inputs (C, H, W); the data has shape "
                             f"{tuple(input_shape)} (use family 'mlp' for feature vectors)")
        return ViT(tuple(input_shape), num_classes, width=cfg.width, depth=cfg.depth, heads=cfg.heads,
                   patch=cfg.patch, mlp_ratio=cfg.mlp_ratio, pool=cfg.pool, dropout=cfg.dropout, stem=cfg.stem)
    if fam == "mlp":
        return MLP(int(math.prod(input_shape)), num_classes, hidden=cfg.hidden, dropout=cfg.dropout)
    if fam.startswith("python:"):
        from toolchain.data import resolve_factory

        fn: Callable[..., Any] = resolve_factory(fam, what=what)
        try:
            model = fn(input_shape=tuple(input_shape), num_classes=num_classes)
        except Exception as e:
            raise ModelError(f"model factory {fam!r} raised {type(e).__name__}: {e}") from e
        if not isinstance(model, nn.Module):
            raise ModelError(f"model factory {fam!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    raise ModelError(f"unknown model family {fam!r} (known: resnet, mobilenet, mlp, vit, python:module:function)")


def recipe_kind(model: nn.Module) -> str:
    """``transformer`` when the model has an attention layer (ours, or ``torch.nn.MultiheadAttention``),
    else ``convnet``: which training recipe suits it (`toolchain.recipes`)."""
    attention = (Attention, nn.MultiheadAttention)
    return "transformer" if any(isinstance(m, attention) or "attention" in type(m).__name__.lower()
                                for m in model.modules()) else "convnet"


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one sample (torch-pruning's counter: conv, linear, bn)."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        macs, _ = tp.utils.count_ops_and_params(model, torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
    return int(macs)
