"""Training losses of the detector family: target assignment, the ground-truth loss and the distillation loss.

**Assignment** (FCOS with centre sampling): a location is a positive of a ground-truth box when its centre lies
inside the box, within ``center_radius`` strides of the box's centre, and its largest distance to the box's sides
falls in its level's range (level ``l`` takes ``(range_scale * s_{l-1}, range_scale * s_l]`` pixels, the first
from 0, the last without bound). A location claimed by several boxes takes the smallest. A box left without any
location (smaller than a stride, or between centres) gets the one location nearest its centre on the level whose
range holds half its longer side, so every object trains. The assignment depends only on the boxes, not on the
predictions: on a few images and a few epochs it gives the same, sensible targets from the first step, where
prediction-driven schemes (SimOTA, TAL) first have to escape their random initial matches.

**Loss** (`detection_loss`): a quality focal loss on the class logits (the positive's target is the IoU of its
predicted box with its ground truth, so that a class score also ranks localisation; ``iou_aware=False`` gives
plain sigmoid focal targets of 1) plus ``box_weight`` times the GIoU loss of the positives' decoded boxes, both
summed and divided by the number of positives. Vectorised over the batch: boxes are padded to the largest count.

**Distillation** (`distillation_loss`): the binary KL divergence between the teacher's and the student's tempered
sigmoid scores over every location and class (the teacher's entropy subtracted from the BCE, so it is zero when
the two agree), times ``T**2``, plus ``box_weight`` times a GIoU imitation of the teacher's decoded boxes where the
teacher's best score is above ``score_threshold`` (weighted by that score); ``alpha`` mixes it with
`detection_loss` on the ground truth.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from edgecore.detect import DecodeParams, anchor_points
from edgecore.errors import ConfigError, DataError, ModelError

__all__ = ["Assignment", "LossConfig", "assign", "decode_boxes", "detection_loss", "distillation_loss", "giou"]

Targets = Sequence[tuple[Any, Any]]  # per image: (boxes (K, 4) xyxy pixels, classes (K,))


@dataclass(frozen=True)
class LossConfig:
    center_radius: float = 1.5  # strides around a box's centre a positive may lie
    range_scale: float = 4.0  # level l takes largest distances in (range_scale * s_{l-1}, range_scale * s_l] pixels
    gamma: float = 2.0  # focal exponent
    iou_aware: bool = True  # the positive's class target is its box's IoU (quality focal loss); False: 1
    box_weight: float = 2.0  # GIoU loss weight against the class loss

    def __post_init__(self) -> None:
        for name in ("center_radius", "range_scale", "box_weight"):
            v = getattr(self, name)
            if not v > 0:
                raise ConfigError(f"detection loss: {name} must be > 0, got {v!r}")
        if not self.gamma >= 0:
            raise ConfigError(f"detection loss: gamma must be >= 0, got {self.gamma!r}")


@dataclass(frozen=True)
class Assignment:
    """Per location of every image: ``positive`` (N, A) bool, ``boxes`` (N, A, 4) the matched ground truth
    (``xyxy`` pixels; zeros for negatives), ``classes`` (N, A) int64 (-1 for negatives)."""

    positive: torch.Tensor
    boxes: torch.Tensor
    classes: torch.Tensor

    @property
    def num_positive(self) -> int:
        return int(self.positive.sum())


@functools.lru_cache(maxsize=16)
def _geometry(params: DecodeParams, range_scale: float, device: torch.device) -> dict[str, torch.Tensor]:
    centres, strides = anchor_points(params)
    st = np.asarray(params.strides, np.float64)
    hi = st * range_scale
    lo = np.concatenate([[0.0], hi[:-1]])
    hi[-1] = np.inf
    level = np.repeat(np.arange(len(st)), [h * w for h, w in params.level_shapes])
    offsets = np.concatenate([[0], np.cumsum([h * w for h, w in params.level_shapes])[:-1]])
    def t(a: Any, dt: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor(np.array(a), dtype=dt, device=device)

    return {"centres": t(centres), "strides": t(strides), "lo": t(lo[level]), "hi": t(hi[level]),
            "level_lo": t(lo), "level_hi": t(hi), "offsets": t(offsets, torch.int64)}


def _pad_targets(targets: Targets, num_classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K, 4) boxes, (N, K) classes, (N, K) valid, K the largest count (at least 1)."""
    bs, cs = [], []
    for i, (b, c) in enumerate(targets):
        b = torch.as_tensor(np.asarray(b, np.float32) if not torch.is_tensor(b) else b, dtype=torch.float32).reshape(-1, 4)
        c = torch.as_tensor(np.asarray(c, np.int64) if not torch.is_tensor(c) else c, dtype=torch.int64).reshape(-1)
        if len(b) != len(c):
            raise DataError(f"detection loss: image {i} has {len(b)} boxes and {len(c)} classes")
        if len(c) and (int(c.min()) < 0 or int(c.max()) >= num_classes):
            raise DataError(f"detection loss: image {i} has class {int(c.max())}, outside 0..{num_classes - 1}")
        bs.append(b)
        cs.append(c)
    n, k = len(cs), max([1] + [len(c) for c in cs])
    boxes = torch.zeros(n, k, 4)
    classes = torch.full((n, k), -1, dtype=torch.int64)
    for i, (b, c) in enumerate(zip(bs, cs)):
        boxes[i, : len(b)] = b
        classes[i, : len(c)] = c
    return boxes.to(device), classes.to(device), (classes >= 0).to(device)


@torch.no_grad()
def assign(targets: Targets, params: DecodeParams, cfg: LossConfig = LossConfig(), *,
           device: torch.device | str = "cpu") -> Assignment:
    """FCOS positives with centre sampling and per-level ranges, smallest box first; a box without any location
    gets the one nearest its centre (see the module docstring)."""
    device = torch.device(device)
    n = len(targets)
    g = _geometry(params, cfg.range_scale, device)
    gt, gcls, valid = _pad_targets(targets, params.num_classes, device)
    cx, cy = g["centres"][:, 0][None, :, None], g["centres"][:, 1][None, :, None]  # (1, A, 1)
    x1, y1, x2, y2 = (gt[..., i][:, None, :] for i in range(4))  # (N, 1, K)
    l, t, r, b = cx - x1, cy - y1, x2 - cx, y2 - cy  # (N, A, K)
    ltrb = torch.stack([l, t, r, b], -1)
    inside = ltrb.amin(-1) > 0
    far = ltrb.amax(-1)
    in_range = (far > g["lo"][None, :, None]) & (far <= g["hi"][None, :, None])
    radius = (cfg.center_radius * g["strides"])[None, :, None]
    gcx, gcy = (x1 + x2) / 2, (y1 + y2) / 2
    near = ((cx - gcx).abs() < radius) & ((cy - gcy).abs() < radius)
    cand = inside & in_range & near & valid[:, None, :]
    area = ((x2 - x1) * (y2 - y1)).expand_as(cand)
    best, idx = torch.where(cand, area, torch.full_like(area, float("inf"))).min(-1)  # (N, A)
    positive = torch.isfinite(best)
    idx = torch.where(positive, idx, torch.zeros_like(idx))

    # boxes that no location took: the location nearest their centre, on the level whose range holds their half-size
    hits = torch.zeros(valid.shape, dtype=torch.int64, device=device).scatter_add_(1, idx, positive.long())
    taken = hits > 0  # taken[n, k]: some positive of image n matches box k
    orphan_n, orphan_k = torch.nonzero(valid & ~taken, as_tuple=True)
    if len(orphan_n):
        ob = gt[orphan_n, orphan_k]  # (M, 4)
        half = torch.maximum(ob[:, 2] - ob[:, 0], ob[:, 3] - ob[:, 1]) / 2
        lvl = ((half[:, None] > g["level_lo"][None]) & (half[:, None] <= g["level_hi"][None])).float().argmax(1)
        s = torch.as_tensor(params.strides, dtype=torch.float32, device=device)[lvl]
        shapes = torch.as_tensor(params.level_shapes, dtype=torch.int64, device=device)[lvl]  # (M, 2) H_l, W_l
        i = ((ob[:, 1] + ob[:, 3]) / 2 / s).floor().long().clamp(min=0)
        j = ((ob[:, 0] + ob[:, 2]) / 2 / s).floor().long().clamp(min=0)
        i, j = torch.minimum(i, shapes[:, 0] - 1), torch.minimum(j, shapes[:, 1] - 1)
        loc = g["offsets"][lvl] + i * shapes[:, 1] + j
        free = ~positive[orphan_n, loc]  # never take a location from a box that has it
        positive[orphan_n[free], loc[free]] = True
        idx[orphan_n[free], loc[free]] = orphan_k[free]
    rows = torch.arange(n, device=device)[:, None]
    boxes = torch.where(positive[..., None], gt[rows, idx], torch.zeros(1, device=device))
    classes = torch.where(positive, gcls[rows, idx], torch.full_like(idx, -1))
    return Assignment(positive=positive, boxes=boxes, classes=classes)


def decode_boxes(raw: torch.Tensor, params: DecodeParams) -> torch.Tensor:
    """The raw output's boxes, ``(N, A, 4)`` ``xyxy`` pixels (differentiable; not clipped)."""
    g = _geometry(params, 1.0, raw.device)
    d = raw[..., :4] * g["strides"][:, None]
    c = g["centres"]
    return torch.cat([c - d[..., :2], c + d[..., 2:]], dim=-1)


def giou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """``(giou, iou)`` of matching rows of ``xyxy`` boxes ``(..., 4)``."""
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / (union + eps)
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    return iou - (hull - union) / (hull + eps), iou


def _check_raw(raw: torch.Tensor, params: DecodeParams, what: str) -> None:
    want = (params.num_anchors, params.channels)
    if raw.ndim != 3 or tuple(raw.shape[1:]) != want:
        raise ModelError(f"{what} has shape {tuple(raw.shape)}; decode params expect (N, {want[0]}, {want[1]})")


def detection_loss(raw: torch.Tensor, targets: Targets, params: DecodeParams, cfg: LossConfig = LossConfig()
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Quality focal loss + ``box_weight`` x GIoU on the raw output ``(N, A, 4 + C)`` for ``targets`` (per image
    ``(boxes xyxy pixels, classes)``); returns ``(loss, parts)`` with ``parts`` = ``cls``, ``box``, ``positives``."""
    _check_raw(raw, params, "detector output")
    if len(targets) != raw.shape[0]:
        raise DataError(f"detection loss: {len(targets)} target entries for a batch of {raw.shape[0]} images")
    a = assign(targets, params, cfg, device=raw.device)
    pos = a.positive
    npos = max(1.0, float(pos.sum()))
    logits = raw[..., 4:].float()
    pred = decode_boxes(raw.float(), params)[pos]
    g, iou = giou(pred, a.boxes[pos])
    box = (1.0 - g).sum() / npos
    target = torch.zeros_like(logits)
    quality = iou.detach().clamp(min=0.0) if cfg.iou_aware else torch.ones_like(iou)
    rows, locs = torch.nonzero(pos, as_tuple=True)
    target[rows, locs, a.classes[pos]] = quality
    cls = _focal(logits, target, cfg.gamma).sum() / npos
    loss = cls + cfg.box_weight * box
    return loss, {"cls": float(cls.detach()), "box": float(box.detach()), "positives": float(pos.sum())}


def _focal(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Elementwise (quality) focal loss with soft targets: BCE x |sigmoid - target|^gamma."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return bce * (torch.sigmoid(logits) - target).abs().pow(gamma)


def distillation_loss(
    student_raw: torch.Tensor,
    teacher_raw: torch.Tensor,
    targets: Targets | None,
    params: DecodeParams,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
    score_threshold: float = 0.3,
    box_weight: float = 2.0,
    cfg: LossConfig = LossConfig(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """``alpha * (T^2 * KL(teacher_T || student_T) + box_weight * box imitation) + (1 - alpha) * detection_loss``.

    The KL is the binary one per (location, class) between tempered sigmoids, summed and divided by the number of
    locations where the teacher is confident (best score above ``score_threshold``; at least one per image). Box
    imitation: GIoU loss between the student's and the teacher's decoded boxes at those locations, weighted by
    the teacher's score. ``targets`` may be None only with ``alpha = 1`` (distilling on unlabelled inputs).
    Returns ``(loss, parts)``: ``soft``, ``box_kd``, ``confident`` and, with ground truth, ``cls``, ``box``.
    """
    if not temperature > 0:
        raise ConfigError(f"distillation: temperature must be > 0, got {temperature!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"distillation: alpha must be in [0, 1], got {alpha!r}")
    if targets is None and alpha < 1.0:
        raise DataError(f"distillation: alpha {alpha} < 1 mixes in the ground-truth loss, but no targets were given")
    _check_raw(student_raw, params, "student output")
    _check_raw(teacher_raw, params, "teacher output")
    if student_raw.shape != teacher_raw.shape:
        raise ModelError(f"student output {tuple(student_raw.shape)} and teacher output {tuple(teacher_raw.shape)} differ")
    teacher_raw = teacher_raw.detach().float()
    s_log, t_log = student_raw[..., 4:].float() / temperature, teacher_raw[..., 4:] / temperature
    p_t = torch.sigmoid(t_log)
    kl = F.binary_cross_entropy_with_logits(s_log, p_t, reduction="none") - F.binary_cross_entropy_with_logits(
        t_log, p_t, reduction="none")
    conf = torch.sigmoid(teacher_raw[..., 4:]).amax(-1)  # (N, A)
    mask = conf > score_threshold
    norm = max(float(mask.sum()), float(student_raw.shape[0]))
    soft = kl.sum() / norm * temperature**2
    parts: dict[str, float] = {"confident": float(mask.sum())}
    if bool(mask.any()):
        g, _ = giou(decode_boxes(student_raw.float(), params)[mask], decode_boxes(teacher_raw, params)[mask])
        w = conf[mask]
        box_kd = ((1.0 - g) * w).sum() / w.sum()
    else:
        box_kd = student_raw.sum() * 0.0
    kd = soft + box_weight * box_kd
    parts.update(soft=float(soft.detach()), box_kd=float(box_kd.detach()))
    if alpha >= 1.0:
        return kd, parts
    gt, gt_parts = detection_loss(student_raw, targets, params, cfg)  # type: ignore[arg-type]
    parts.update(gt_parts)
    return alpha * kd + (1.0 - alpha) * gt, parts
