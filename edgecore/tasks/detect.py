"""Detection: one dense raw output per image, decoded into boxes (`edgecore.detect`).

Raw output ``(N, A, 4 + C)`` (docs/detection.md); the task's parameters are its `DecodeParams` (the manifest's
``task.params``). Targets, where a split has them, are one padded array ``(N, K_max, 5)`` of
``[class, x1, y1, x2, y2]`` in input pixels per object, class -1 for padding (`toolchain.data.pad_objects`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from edgecore.detect import DecodeParams, Detections, box_iou, decode
from edgecore.errors import ConfigError, DataError

from .base import Task, TaskSpec

__all__ = ["Detect", "QUALITY_IOU", "image_ap", "targets_as_detections"]

QUALITY_IOU = 0.5  # a detection is right when it overlaps an unclaimed object of its class this much
_EPS = 1e-6


def targets_as_detections(targets: Any) -> list[Detections]:
    """The padded targets ``(N, K_max, 5)`` as one `Detections` per image (score 1)."""
    y = np.asarray(targets, np.float32)
    if y.ndim != 3 or y.shape[2] != 5:
        raise DataError(f"detection targets must be (N, K, 5) [class, x1, y1, x2, y2], got shape {y.shape}")
    out = []
    for row in y:
        keep = row[:, 0] >= 0
        out.append(Detections(np.ascontiguousarray(row[keep, 1:]), np.ones(int(keep.sum()), np.float32),
                              row[keep, 0].astype(np.int64)))
    return out


def match(det: Detections, truth: Detections, iou: float = QUALITY_IOU) -> np.ndarray:
    """Per detection (best first), whether it takes an unclaimed object of its class at IoU >= ``iou``
    (COCO's greedy matching: each detection the unclaimed object it overlaps most)."""
    tp = np.zeros(len(det), bool)
    if not len(det) or not len(truth):
        return tp
    m = box_iou(det.boxes, truth.boxes)
    m[np.asarray(det.classes)[:, None] != np.asarray(truth.classes)[None, :]] = -1.0
    free = np.ones(len(truth), bool)
    for d in np.argsort(-np.asarray(det.scores), kind="stable"):
        row = np.where(free, m[d], -1.0)
        j = int(np.argmax(row))
        if row[j] >= iou:
            free[j] = False
            tp[d] = True
    return tp


def image_ap(det: Detections, truth: Detections, iou: float = QUALITY_IOU) -> float:
    """Average precision of one image's detections at IoU ``iou`` (all-point interpolation over its objects).

    An image without objects scores 1 when no detection is sure of itself (score >= 0.5), else 0.
    """
    if not len(truth):
        return float(not np.any(np.asarray(det.scores) >= 0.5))
    if not len(det):
        return 0.0
    order = np.argsort(-np.asarray(det.scores), kind="stable")
    tp = match(det, truth, iou)[order].astype(np.float64)
    ctp = np.cumsum(tp)
    recall = ctp / len(truth)
    precision = ctp / np.arange(1, len(tp) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or beyond
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * envelope))


class Detect(Task):
    """Raw output ``(N, A, 4 + C)``; parameters: the `DecodeParams` (``to_dict`` form)."""

    name: ClassVar[str] = "detect"
    postprocess_label: ClassVar[str | None] = "decode+NMS"

    def __init__(self, spec: TaskSpec | None = None) -> None:
        super().__init__(spec)
        self.params = DecodeParams.from_dict(self.spec.params)

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> list[str]:
        """The parameters must be a whole `DecodeParams` (``input_size``, ``strides``, ``num_classes`` ...)."""
        try:
            DecodeParams.from_dict(params)
        except ConfigError as e:
            return [str(e)]
        return []

    def detections(self, raw: np.ndarray) -> list[Detections]:
        """One `Detections` per image: `edgecore.detect.decode` with the task's parameters."""
        return decode(raw, self.params)

    def postprocess(self, raw: np.ndarray) -> list[Detections]:
        """Decode + NMS (`detections`): what the device does to every frame before confidence and answer."""
        return self.detections(raw)

    def confidence(self, raw: np.ndarray, *, measure: str, temperature: float) -> np.ndarray:
        """How sure the image's answer is: the weakest of its detections.

        Each decoded detection's score ``s`` is tempered (``p = sigmoid(logit(s) / temperature)``) and counts
        ``|2p - 1|``: 1 for a box that is surely there (p near 1) or surely not (p near 0), 0 for a coin toss.
        The image's confidence is the least of these (1 with no detections): one ambiguous box is enough to ask
        the cloud. ``measure`` (the classifier's max_prob / margin / entropy) does not change it. (Another
        choice: 1 - the share of detections in an ambiguous band of scores, which weighs crowded images.)
        """
        out = np.ones(len(np.asarray(raw)) if np.asarray(raw).ndim == 3 else 1, np.float64)
        t = float(temperature) if temperature and temperature > 0 else 1.0
        for i, d in enumerate(self.detections(raw)):
            if len(d):
                s = np.clip(d.scores.astype(np.float64), _EPS, 1 - _EPS)
                p = 1.0 / (1.0 + np.exp(-np.log(s / (1 - s)) / t))
                out[i] = float(np.min(np.abs(2 * p - 1)))
        return out

    def quality(self, raw: np.ndarray, targets: Any) -> np.ndarray:
        """Per image, the average precision of its detections at IoU 0.5 (`image_ap`), in [0, 1]."""
        dets = self.detections(raw)
        truth = targets_as_detections(targets)
        if len(dets) != len(truth):
            raise DataError(f"detection quality: {len(dets)} outputs for {len(truth)} targets")
        return np.array([image_ap(d, t) for d, t in zip(dets, truth)], np.float64)

    def answer(self, raw_one: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
        """``{"detections": [{"box": [x1, y1, x2, y2], "score": s, "class": c, "label": name}, ...]}``, best
        first, boxes in input pixels (2 decimals), scores to 6 digits."""
        (d,) = self.detections(np.asarray(raw_one)[None])

        def name(c: int) -> str:
            return labels[c] if c < len(labels) else str(c)

        return {"detections": [
            {"box": [round(float(v), 2) for v in b], "score": round(float(s), 6), "class": int(c), "label": name(int(c))}
            for b, s, c in zip(d.boxes, d.scores, d.classes)
        ]}
