"""Decoding the raw output of our anchor-free detectors into boxes: the one implementation every side runs.

The raw output contract (FCOS/YOLOX-style decoupled heads, every pyramid level flattened into one tensor):

* one float tensor of shape ``(N, A, 4 + C)``;
* ``A = sum(H_l * W_l)`` over the levels, in order of increasing stride, row-major (``y`` then ``x``) within a
  level, where ``H_l = ceil(H / stride_l)`` and ``W_l = ceil(W / stride_l)`` for an input of ``(H, W)`` pixels;
* the location at row ``i``, column ``j`` of a level of stride ``s`` has its centre at
  ``((j + 0.5) * s, (i + 0.5) * s)`` input pixels;
* channels ``0..3`` are the distances ``(left, top, right, bottom)`` from that centre to the box's sides, in
  units of the level's stride, already non-negative (the graph applies ReLU or exp);
* channels ``4..4+C`` are per-class logits; a class's score is their sigmoid.

`decode` keeps every (location, class) pair whose score is above ``score_threshold`` (a location may propose
several classes), takes the ``pre_nms_top_k`` best, suppresses with greedy `nms` and keeps ``max_detections``.
Boxes come back as ``xyxy`` in input pixels, clipped to the input.

Numpy only (the device imports it); every step is vectorised, the only Python loops run once per image and
once per *kept* box in `nms` (at most ``max_detections`` times).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np

from edgecore.errors import ConfigError, ModelError

__all__ = ["DecodeParams", "Detections", "anchor_points", "decode", "nms", "box_iou"]


@dataclass(frozen=True)
class DecodeParams:
    """How to turn the raw output into detections; lives in the bundle manifest (`to_dict` / `from_dict`).

    ``input_size`` is ``(H, W)`` in pixels of the model's input; ``strides`` the pyramid levels' strides in
    increasing order. A location's class pair is a candidate when its score (sigmoid of the logit) is strictly
    above ``score_threshold``; `nms` suppresses a box whose IoU with a better-scoring kept box of the same class
    (any class when ``class_agnostic``) is strictly above ``iou_threshold``.
    """

    input_size: tuple[int, int]
    strides: tuple[int, ...]
    num_classes: int
    score_threshold: float = 0.05
    iou_threshold: float = 0.6
    max_detections: int = 100
    pre_nms_top_k: int = 1000
    class_agnostic: bool = False

    def __post_init__(self) -> None:
        def bad(field: str, why: str, value: object) -> ConfigError:
            return ConfigError(f"decode.{field}: {why}, got {value!r}")

        size = self.input_size
        if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(_is_int(v) and v > 0 for v in size):
            raise bad("input_size", "expected two positive integers (H, W)", size)
        strides = self.strides
        if not isinstance(strides, (tuple, list)) or not strides or not all(_is_int(v) and v > 0 for v in strides):
            raise bad("strides", "expected one or more positive integers", strides)
        if any(b <= a for a, b in zip(strides, strides[1:])):
            raise bad("strides", "must be strictly increasing (levels in order of increasing stride)", strides)
        if not _is_int(self.num_classes) or self.num_classes < 1:
            raise bad("num_classes", "expected an integer >= 1", self.num_classes)
        for name in ("score_threshold", "iou_threshold"):
            v = getattr(self, name)
            if not _is_real(v) or not 0.0 <= float(v) <= 1.0:
                raise bad(name, "expected a number in [0, 1]", v)
        for name in ("max_detections", "pre_nms_top_k"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise bad(name, "expected an integer >= 1", v)
        if not isinstance(self.class_agnostic, bool):
            raise bad("class_agnostic", "expected true or false", self.class_agnostic)
        # normalise lists (from JSON) to tuples and numbers to their types, so equal params hash equal
        object.__setattr__(self, "input_size", (int(size[0]), int(size[1])))
        object.__setattr__(self, "strides", tuple(int(s) for s in strides))
        object.__setattr__(self, "num_classes", int(self.num_classes))
        object.__setattr__(self, "score_threshold", float(self.score_threshold))
        object.__setattr__(self, "iou_threshold", float(self.iou_threshold))
        object.__setattr__(self, "max_detections", int(self.max_detections))
        object.__setattr__(self, "pre_nms_top_k", int(self.pre_nms_top_k))

    @property
    def level_shapes(self) -> tuple[tuple[int, int], ...]:
        """``(H_l, W_l)`` per level: ``ceil(H / stride)``, ``ceil(W / stride)``."""
        h, w = self.input_size
        return tuple((-(-h // s), -(-w // s)) for s in self.strides)

    @property
    def num_anchors(self) -> int:
        """``A``: the number of locations over all levels."""
        return sum(h * w for h, w in self.level_shapes)

    @property
    def channels(self) -> int:
        """``4 + C``: the raw output's last dimension."""
        return 4 + self.num_classes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (lists, not tuples)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["input_size"] = list(self.input_size)
        d["strides"] = list(self.strides)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DecodeParams":
        """The inverse of `to_dict`; unknown or missing keys and bad values raise `ConfigError` naming the key."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"decode: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"decode: unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(sorted(known))})")
        missing = [k for k in ("input_size", "strides", "num_classes") if k not in data]
        if missing:
            raise ConfigError(f"decode: missing key(s) {', '.join(map(repr, missing))}")
        kw = dict(data)
        for k in ("input_size", "strides"):
            if isinstance(kw[k], list):
                kw[k] = tuple(kw[k])
        return cls(**kw)


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)


@dataclass(frozen=True, eq=False)
class Detections:
    """The detections of one image, best first: ``boxes`` (K, 4) float32 ``xyxy`` in input pixels,
    ``scores`` (K,) float32, ``classes`` (K,) int64."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64))

    def take(self, index: np.ndarray | slice) -> "Detections":
        """A subset (an index array, a boolean mask or a slice)."""
        return Detections(self.boxes[index], self.scores[index], self.classes[index])


@functools.lru_cache(maxsize=32)
def anchor_points(params: DecodeParams) -> tuple[np.ndarray, np.ndarray]:
    """``(centres, strides)``: (A, 2) float32 ``(x, y)`` location centres in input pixels and (A,) float32
    strides, in the raw output's order. Cached per params; the arrays are read-only."""
    centres, strides = [], []
    for (h, w), s in zip(params.level_shapes, params.strides):
        ys, xs = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
        centres.append(np.stack([(xs.ravel() + 0.5) * s, (ys.ravel() + 0.5) * s], axis=1))
        strides.append(np.full(h * w, s, np.float32))
    c, st = np.concatenate(centres).astype(np.float32), np.concatenate(strides)
    c.setflags(write=False)
    st.setflags(write=False)
    return c, st


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``xyxy`` boxes: (N, 4) x (M, 4) -> (N, M) float32; 0 where the union is empty.

    ``inter / (area_a + area_b - inter)`` in float32 (the boxes' own precision): the arithmetic `nms` compares
    with its threshold.
    """
    ca = _Columns(a)
    cb = ca if b is a else _Columns(b)
    iou = ca.iou(slice(None), cb, slice(None))
    iou[np.isnan(iou)] = 0.0
    return iou


class _Columns:
    """Boxes as four contiguous float32 columns plus their areas: what the pairwise IoU reads."""

    __slots__ = ("x1", "y1", "x2", "y2", "area")

    def __init__(self, boxes: np.ndarray) -> None:
        cols = np.array(np.asarray(boxes, np.float32).reshape(-1, 4).T, np.float32, order="C")
        self.x1, self.y1, self.x2, self.y2 = cols
        self.area = (self.x2 - self.x1) * (self.y2 - self.y1)

    def iou(self, i: np.ndarray | slice, other: "_Columns", j: np.ndarray | slice) -> np.ndarray:
        """IoU of rows ``i`` of these boxes with rows ``j`` of ``other``: (len(i), len(j)) float32."""
        iw = np.minimum.outer(self.x2[i], other.x2[j])
        iw -= np.maximum.outer(self.x1[i], other.x1[j])
        np.maximum(iw, 0.0, out=iw)
        ih = np.minimum.outer(self.y2[i], other.y2[j])
        ih -= np.maximum.outer(self.y1[i], other.y1[j])
        np.maximum(ih, 0.0, out=ih)
        iw *= ih  # the intersection
        union = np.add.outer(self.area[i], other.area[j])
        union -= iw
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.divide(iw, union, out=iw)  # NaN where the union is empty (never above a threshold)


_BLOCK = 64  # candidates resolved at once by `nms` (a B x B matrix per block)
_UPPER = np.triu(np.ones((_BLOCK, _BLOCK), bool), 1)  # [i, j]: i comes before j


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    iou_threshold: float,
    max_detections: int,
    class_agnostic: bool = False,
) -> np.ndarray:
    """Greedy non-maximum suppression; the kept indices (int64), best score first.

    The result is that of the textbook loop: visit the boxes by decreasing score (ties: lower index first) and
    drop a box whose IoU (as `box_iou` computes it) with an already kept box of the same class (any class when
    ``class_agnostic``) is strictly above ``iou_threshold``; stop after ``max_detections`` kept boxes.

    Vectorised in blocks of the next candidates: a block first loses the boxes that the boxes kept so far
    suppress (one matrix), then resolves the greedy order inside itself as the fixed point of
    ``keep[j] = not any(keep[i] and suppresses[i, j] for i < j)``, reached from "keep all" by matrix-vector
    products (exact: after t steps every box whose longest chain of suppressors is shorter than t is final).
    """
    scores = np.asarray(scores).reshape(-1)
    n = len(scores)
    if n == 0 or max_detections < 1:
        return np.zeros((0,), np.int64)
    order = np.argsort(-scores, kind="stable")
    b = _Columns(np.asarray(boxes, np.float32).reshape(-1, 4)[order])
    cls = None if class_agnostic else np.asarray(classes).reshape(-1)[order]
    thr = _f32_below(iou_threshold)
    kept = np.zeros((0,), np.int64)  # positions in score order
    start = 0
    while start < n and len(kept) < max_detections:
        blk = np.arange(start, min(start + _BLOCK, n))
        start += _BLOCK
        if len(kept):
            over = b.iou(kept, b, blk) > thr
            if cls is not None:
                over &= np.equal.outer(cls[kept], cls[blk])
            blk = blk[~over.any(axis=0)]
            if len(blk) == 0:
                continue
        m = len(blk)
        sup = b.iou(blk, b, blk) > thr
        if cls is not None:
            sup &= np.equal.outer(cls[blk], cls[blk])
        sup &= _UPPER[:m, :m]  # sup[i, j]: i (better) suppresses j
        if sup.any():
            supf = sup.astype(np.float32)
            keep = np.ones(m, bool)
            for _ in range(m + 1):  # converges in (longest suppressor chain + 1) steps, usually 2 or 3
                nxt = keep.astype(np.float32) @ supf == 0
                if np.array_equal(nxt, keep):
                    break
                keep = nxt
            blk = blk[keep]
        kept = np.concatenate([kept, blk])
    return order[kept[:max_detections]]


def decode(raw: np.ndarray, params: DecodeParams) -> list[Detections]:
    """Raw output ``(N, A, 4 + C)`` -> one `Detections` per image (see the module docstring for the contract).

    A raw output whose shape does not match ``params`` raises `ModelError` naming both shapes.
    """
    raw = np.asarray(raw)
    a, ch = params.num_anchors, params.channels
    if raw.ndim == 2:
        raw = raw[None]
    if raw.ndim != 3 or raw.shape[1] != a or raw.shape[2] != ch:
        raise ModelError(
            f"detector output has shape {tuple(raw.shape)}; decode params expect (N, {a}, {ch}) "
            f"(input {params.input_size[0]}x{params.input_size[1]}, strides {list(params.strides)}, "
            f"{params.num_classes} classes)"
        )
    centres, strides = anchor_points(params)
    h, w = params.input_size
    c = params.num_classes
    logits = raw[:, :, 4:].astype(np.float32, copy=False)
    thr = _f32_below(params.score_threshold)
    bound = _logit_below(thr)  # a logit at or below it scores at most thr: only those above need a sigmoid
    out: list[Detections] = []
    for n in range(raw.shape[0]):
        cand = np.flatnonzero(logits[n] > bound)  # (location, class) pairs, ascending flat index
        s = _sigmoid(logits[n][np.divmod(cand, c)])
        above = s > thr  # the exact test, on the few pairs past the bound
        cand, s = cand[above], s[above]
        if len(cand) == 0:
            out.append(Detections.empty())
            continue
        if len(cand) > params.pre_nms_top_k:
            cand, s = _top_k(cand, s, params.pre_nms_top_k)
        loc, cl = np.divmod(cand, c)
        d = raw[n, loc, :4].astype(np.float32, copy=False) * strides[loc, None]
        ctr = centres[loc]
        boxes = np.empty((len(loc), 4), np.float32)
        boxes[:, 0:2] = ctr - d[:, 0:2]
        boxes[:, 2:4] = ctr + d[:, 2:4]
        np.clip(boxes[:, 0::2], 0.0, np.float32(w), out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0.0, np.float32(h), out=boxes[:, 1::2])
        keep = nms(boxes, s, cl, params.iou_threshold, params.max_detections, params.class_agnostic)
        out.append(Detections(boxes[keep], s[keep].astype(np.float32), cl[keep].astype(np.int64)))
    return out


def _f32_below(t: float) -> np.float32:
    """The float32 ``t32`` with ``x > t32`` exactly when ``x > t`` for every float32 ``x`` (``t`` a Python float).

    Comparing float32 values with ``np.float32(t)`` would round the threshold up or down.
    """
    t32 = np.float32(t)
    if float(t32) > float(t):
        t32 = np.nextafter(t32, np.float32(-np.inf))
    return t32


def _logit_below(t32: np.float32) -> np.float32:
    """A float32 ``b`` with ``sigmoid(x) <= t32`` (as `_sigmoid` computes it) for every float32 ``x <= b``.

    `_sigmoid`'s result is within a few float32 ulps of 1 (< 1e-6) of the true sigmoid, so ``sigmoid(x) > t32``
    needs a true sigmoid above ``t32 - 1e-6``: the logit of that, rounded down, bounds every candidate from below.
    """
    t = float(t32) - 1e-6
    if t <= 0.0:
        return np.float32(-np.inf)
    b = np.float32(math.log(t) - math.log1p(-t))
    return np.nextafter(b, np.float32(-np.inf))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Float32 sigmoid without overflow warnings."""
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x, dtype=np.float32))).astype(np.float32, copy=False)


def _top_k(index: np.ndarray, score: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best by score; among equal scores at the cut, the lower indices (``index`` is ascending).

    Exact and deterministic, in linear time (one partition) rather than a full sort.
    """
    kth = np.partition(score, len(score) - k)[len(score) - k]  # the k-th largest score
    above = score > kth
    need = k - int(above.sum())
    at = np.flatnonzero(score == kth)[:need]
    pick = np.flatnonzero(above)
    pick = np.sort(np.concatenate([pick, at]))
    return index[pick], score[pick]

