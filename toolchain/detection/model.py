"""The detector family: a backbone of the classification families' blocks, an FPN over strides 8/16/32 and one
anchor-free decoupled head shared across the levels (FCOS/YOLOX style).

The graph ends in the raw output of `edgecore.detect`: one tensor ``(N, A, 4 + C)``, levels in increasing
stride, row-major within a level; channels ``0..3`` the ``(left, top, right, bottom)`` distances in units of the
level's stride, made non-negative by a ReLU (FCOS with normalised regression targets does the same in training
and inference; unlike ``exp`` it quantizes like any other activation), then ``C`` class logits.

Backbones reuse `toolchain.models`' blocks (`BasicBlock` for ``resnet``, `InvertedResidual` with
`MobileNet.STAGES` for ``mobilenet``) but, unlike the classifiers, always downsample by 2 in the stem and in each
stage, so the level strides are fixed (8, 16, 32) whatever the input size: what `DecodeParams` assumes. Every
stride-2 convolution maps ``H`` to ``ceil(H / 2)``; the FPN's nearest ×2 upsampling is cropped to the finer
level when a side is odd, so any input size works.

The head's convolutions are shared by the levels, its BatchNorms are not (see `Head`).

Knobs: ``width`` / ``depth`` (resnet), ``width`` / ``width_mult`` / ``depth_mult`` (mobilenet), ``neck_width``
(FPN and head channels) and ``head_convs`` (convolutions per head branch). Once
`toolchain.passes.qat.fold_batchnorm` has folded the BatchNorms, the exported graph holds Conv, Relu (or
Sigmoid/Mul for SiLU), Add, Resize (nearest), Concat, Reshape and Transpose, plus shape arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from edgecore.detect import DecodeParams
from edgecore.errors import ModelError
from toolchain.config import ModelConfig
from toolchain.models import (
    BasicBlock,
    InvertedResidual,
    MobileNet,
    _conv_bn,
    _make_divisible,
)

__all__ = ["BACKBONES", "STRIDES", "Detector", "build_detector", "detection_params"]

STRIDES = (8, 16, 32)
BACKBONES = ("resnet", "mobilenet")
ACTIVATIONS = ("relu", "silu")
PRIOR_PROB = 0.01  # initial class score: focal loss starts from "almost everything is background"
BOX_BIAS = 1.0  # initial distances, in strides: a 2x2-stride box around every location


def _conv_bn_act(cin: int, cout: int, k: int, act: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.SiLU() if act == "silu" else nn.ReLU(),
    )


class ResNetBackbone(nn.Module):
    """Stem (stride 2) and four stages of `BasicBlock` (width x 1, 2, 4, 8), each starting with stride 2; returns
    the last three stages' outputs (strides 8, 16, 32)."""

    def __init__(self, in_ch: int, *, width: int, depth: int) -> None:
        super().__init__()
        self.stem = _conv_bn(in_ch, width, 3, 2)
        stages: list[nn.Module] = []
        cin = width
        for s in range(4):
            cout = width * 2**s
            stages.append(nn.Sequential(*[BasicBlock(cin if b == 0 else cout, cout, 2 if b == 0 else 1) for b in range(depth)]))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.channels = (width * 2, width * 4, width * 8)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 1:
                outs.append(x)
        return outs


class MobileNetBackbone(nn.Module):
    """Stem (stride 2) and `MobileNet.STAGES` of `InvertedResidual`, each starting with stride 2; returns the last
    three stages' outputs (strides 8, 16, 32)."""

    def __init__(self, in_ch: int, *, width: int, width_mult: float, depth_mult: float) -> None:
        super().__init__()
        cin = _make_divisible(width * width_mult)
        self.stem = _conv_bn(in_ch, cin, 3, 2)
        stages: list[nn.Module] = []
        chans = []
        for expand, mult, n in MobileNet.STAGES:
            cout = _make_divisible(width * mult * width_mult)
            blocks = []
            for b in range(max(1, round(n * depth_mult))):
                blocks.append(InvertedResidual(cin, cout, 2 if b == 0 else 1, expand))
                cin = cout
            stages.append(nn.Sequential(*blocks))
            chans.append(cout)
        self.stages = nn.ModuleList(stages)
        self.channels = tuple(chans[-3:])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= len(self.stages) - 3:
                outs.append(x)
        return outs


def _upsample_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Nearest x2, cropped to ``like`` (a coarser side of ``ceil(H / 2)`` doubles to one pixel more when odd)."""
    up = F.interpolate(x, scale_factor=2.0, mode="nearest")
    h, w = like.shape[-2:]
    if up.shape[-2] != h or up.shape[-1] != w:
        up = up[..., :h, :w]
    return up


class FPN(nn.Module):
    """Top-down pyramid: 1x1 laterals to ``width`` channels, nearest upsampling and addition, a 3x3 conv per level."""

    def __init__(self, channels: Sequence[int], width: int, act: str) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(_conv_bn(c, width, 1, act=False) for c in channels)
        self.smooth = nn.ModuleList(_conv_bn_act(width, width, 3, act) for _ in channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        lat = [m(f) for m, f in zip(self.lateral, feats)]
        top = [lat[-1]]
        for f in reversed(lat[:-1]):
            top.insert(0, f + _upsample_to(top[0], f))
        return [m(f) for m, f in zip(self.smooth, top)]


class Head(nn.Module):
    """Decoupled branches whose convolutions every level shares: ``convs`` 3x3 conv + BN + act each, then a 1x1
    prediction (4 box distances through a ReLU; ``num_classes`` logits).

    The BatchNorms are per level (RTMDet's "shared conv, separate BN"): one BN fed by all levels keeps running
    statistics that match none of them, and the eval-mode model scores far below the train-mode one. Each level's
    branch is a ``Sequential`` of ``Sequential(shared conv, its BN, act)``, so `toolchain.passes.qat.fold_batchnorm`
    folds every BN into its own copy of the conv (the deployed graph has per-level convs and no BN).
    """

    def __init__(self, width: int, num_classes: int, convs: int, act: str, levels: int) -> None:
        super().__init__()

        def towers() -> nn.ModuleList:
            shared = [nn.Conv2d(width, width, 3, padding=1, bias=False) for _ in range(convs)]
            return nn.ModuleList(
                nn.Sequential(*[nn.Sequential(conv, nn.BatchNorm2d(width), nn.SiLU() if act == "silu" else nn.ReLU())
                                for conv in shared])
                for _ in range(levels)
            )

        self.cls_towers, self.box_towers = towers(), towers()
        self.cls_pred = nn.Conv2d(width, num_classes, 1)
        self.box_pred = nn.Conv2d(width, 4, 1)
        nn.init.normal_(self.cls_pred.weight, std=0.01)
        nn.init.constant_(self.cls_pred.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))  # type: ignore[arg-type]
        nn.init.normal_(self.box_pred.weight, std=0.01)
        nn.init.constant_(self.box_pred.bias, BOX_BIAS)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        box = F.relu(self.box_pred(self.box_towers[level](x)))
        cls = self.cls_pred(self.cls_towers[level](x))
        return torch.cat([box, cls], dim=1)  # (N, 4 + C, H, W)


class Detector(nn.Module):
    """Backbone -> FPN -> shared decoupled head; ``forward(x)`` is the raw output ``(N, A, 4 + C)``."""

    strides = STRIDES

    def __init__(self, backbone: ResNetBackbone | MobileNetBackbone, num_classes: int, *, neck_width: int, head_convs: int, act: str = "relu") -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ModelError(f"detector activation {act!r} unknown (known: {', '.join(ACTIVATIONS)})")
        if num_classes < 1 or neck_width < 1 or head_convs < 0:
            raise ModelError(
                f"detector needs num_classes >= 1, neck_width >= 1 and head_convs >= 0, "
                f"got {num_classes}, {neck_width}, {head_convs}"
            )
        self.num_classes = int(num_classes)
        self.backbone = backbone
        self.neck = FPN(backbone.channels, neck_width, act)
        self.head = Head(neck_width, num_classes, head_convs, act, levels=len(self.strides))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = [self.head(p, i).flatten(2) for i, p in enumerate(self.neck(self.backbone(x)))]  # (N, 4 + C, H_l * W_l) each
        return torch.cat(levels, dim=2).transpose(1, 2)

    def output_layers(self) -> list[nn.Module]:
        """The layers whose output channels are the raw output's: the pruner must leave them whole."""
        return [self.head.cls_pred, self.head.box_pred]


def build_detector(cfg: ModelConfig, *, input_shape: tuple[int, ...], num_classes: int, neck_width: int | None = None,
                   head_convs: int = 2, act: str = "relu", what: str = "teacher.family") -> Detector:
    """A `Detector` whose backbone is ``cfg.family`` (``resnet``: ``width``, ``depth``; ``mobilenet``: ``width``,
    ``width_mult``, ``depth_mult``). ``neck_width`` defaults to the stride-8 backbone stage's channels (at least
    16). ``input_shape`` is ``(C, H, W)``; ``what`` names the config key in errors."""
    if len(input_shape) != 3:
        raise ModelError(f"a detector needs image inputs (C, H, W); the data has shape {tuple(input_shape)}")
    c, h, w = (int(v) for v in input_shape)
    if min(h, w) < 1:
        raise ModelError(f"a detector needs a positive input size, got {h}x{w}")
    fam = cfg.family
    backbone: ResNetBackbone | MobileNetBackbone
    if fam == "resnet":
        if cfg.width < 1 or cfg.depth < 1:
            raise ModelError(f"{what}: resnet detector needs width >= 1 and depth >= 1, got {cfg.width}, {cfg.depth}")
        backbone = ResNetBackbone(c, width=cfg.width, depth=cfg.depth)
    elif fam == "mobilenet":
        backbone = MobileNetBackbone(c, width=cfg.width, width_mult=cfg.width_mult, depth_mult=cfg.depth_mult)
    else:
        raise ModelError(f"{what}: {fam!r} cannot be a detector backbone (known: {', '.join(BACKBONES)})")
    if neck_width is None:
        neck_width = max(16, backbone.channels[0])
    return Detector(backbone, num_classes, neck_width=neck_width, head_convs=head_convs, act=act)


def detection_params(model: nn.Module, input_size: int | tuple[int, int], **decode: object) -> DecodeParams:
    """The `DecodeParams` of ``model``'s raw output for ``input_size`` (``H`` or ``(H, W)``) pixels; ``decode``
    overrides the thresholds and counts (``score_threshold=0.3`` ...)."""
    strides = getattr(model, "strides", None)
    num_classes = getattr(model, "num_classes", None)
    if strides is None or num_classes is None:
        raise ModelError(f"{type(model).__name__} is not a detector: it has no 'strides' and 'num_classes'")
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    return DecodeParams(input_size=size, strides=tuple(strides), num_classes=int(num_classes), **decode)  # type: ignore[arg-type]
