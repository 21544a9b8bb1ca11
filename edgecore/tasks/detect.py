"""Detection: one dense raw output per image, decoded into boxes (`edgecore.detect`).

Raw output ``(N, A, 4 + C)`` (docs/detection.md); the task's parameters are its `DecodeParams` (the manifest's
``task.params``). Targets, where a split has them, are one padded array ``(N, K_max, 5)`` of
``[class, x1, y1, x2, y2]`` in input pixels per object, class -1 for padding (`toolchain.data.pad_objects`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from edgecore import wire
from edgecore.detect import DecodeParams, Detections, box_iou, decode
from edgecore.errors import ConfigError, DataError

from .base import Task, TaskSpec

__all__ = ["Detect", "OBJECT_SCORE", "QUALITY_IOU", "as_json", "image_ap", "kept_detections", "targets_as_detections"]

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
        return _confidence_of(self.detections(raw), temperature)

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
        return {"detections": as_json(d, labels)}

    def teacher_record(self, answer: Mapping[str, Any]) -> tuple[bytes, int, float]:
        """The detections as JSON, the best detection's class (-1 with none), and the uncertainty of the least
        sure detection (1 - |2s - 1|: 0 for a score of 0 or 1, 1 for a coin toss; 0 with no detections)."""
        dets = list(answer.get("detections") or [])
        scores = np.array([float(d["score"]) for d in dets], np.float64)
        unsure = float(1.0 - np.min(np.abs(2 * scores - 1))) if len(scores) else 0.0
        return wire.dumps({"detections": dets}), int(dets[0]["class"]) if dets else -1, unsure

    # --- the device's side ------------------------------------------------------------------------------------
    OUTPUT_STATS: ClassVar[tuple[str, ...]] = ("objects", "top_score")

    def output_shape(self, n_labels: int) -> tuple[int, ...]:
        """``(A, 4 + C)``: every location of every level, its box distances then its class logits."""
        return (self.params.num_anchors, self.params.channels)

    def decide(self, raw: np.ndarray, *, measure: str, temperature: float,
               labels: Sequence[str]) -> tuple[Sequence[Any], np.ndarray]:
        """Each image's detections (`answer`'s list) and its confidence, from one decode."""
        dets = self.detections(raw)
        return [as_json(d, labels) for d in dets], _confidence_of(dets, temperature)

    def label(self, prediction: Any, labels: Sequence[str]) -> str:
        """The names of the objects found (score >= 0.5), best first: ``"circle, star"``; ``""`` for none."""
        return ", ".join(str(d["label"]) for d in prediction if d["score"] >= OBJECT_SCORE)

    def read_reply(self, reply: Mapping[str, Any]) -> Any | None:
        """``detections``: a list (at most ``max_detections``) of boxes with a finite ``box`` of four numbers
        (x1 <= x2, y1 <= y2), a ``score`` in [0, 1] and a ``class`` among the model's (its ``label`` as the gateway names it, else the class's number)."""
        dets = reply.get("detections")
        if not isinstance(dets, list) or len(dets) > self.params.max_detections:
            return None
        out = []
        for d in dets:
            if not isinstance(d, dict):
                return None
            box: Any = d.get("box")
            score: Any = d.get("score")
            cls: Any = d.get("class")
            if (not isinstance(box, list) or len(box) != 4 or not all(_finite(v) for v in box)
                    or box[0] > box[2] or box[1] > box[3] or not _finite(score) or not 0.0 <= score <= 1.0
                    or not isinstance(cls, int) or isinstance(cls, bool) or not 0 <= cls < self.params.num_classes):
                return None
            out.append({"box": [float(v) for v in box], "score": float(score), "class": cls,
                        "label": d["label"] if isinstance(d.get("label"), str) else str(cls)})
        return out

    def sample_targets(self, samples: Sequence[Any]) -> Any:
        """Padded objects ``(N, K_max, 5)``: the boxes a person kept, else the teacher's scoring at least 0.5."""
        rows = [[[float(d["class"]), *(float(v) for v in d["box"])] for d in kept_detections(s) or []]
                for s in samples]
        y = np.full((len(rows), max([1] + [len(r) for r in rows]), 5), 0.0, np.float32)
        y[:, :, 0] = -1
        for i, r in enumerate(rows):
            if r:
                y[i, : len(r)] = np.asarray(r, np.float32)
        return y

    def output_stats(self, prediction: Any) -> tuple[float, ...]:
        """``objects``: detections scoring at least 0.5; ``top_score``: the best score (0 with none)."""
        scores = [d["score"] for d in prediction]
        return float(sum(s >= OBJECT_SCORE for s in scores)), float(max(scores, default=0.0))


OBJECT_SCORE = 0.5  # a detection this sure counts as an object in labels and telemetry


def kept_detections(sample: Any, min_score: float = OBJECT_SCORE) -> list[dict[str, Any]] | None:
    """A collected sample's objects (`edgecore.samples.Sample`): every box a person kept, else the teacher's
    scoring at least ``min_score``; None when its answer holds no list of detections (a sample of another task).
    What the gateway evaluates a bundle against and what a refresh trains on."""
    dets = (sample.answer or {}).get("detections")
    if not isinstance(dets, list):
        return None
    return list(dets) if sample.human_answer is not None else [d for d in dets if float(d.get("score", 0.0)) >= min_score]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def as_json(d: Detections, labels: Sequence[str]) -> list[dict[str, Any]]:
    """One image's detections in the wire's form (`Detect.answer`)."""
    def name(c: int) -> str:
        return labels[c] if c < len(labels) else str(c)

    return [{"box": [round(float(v), 2) for v in b], "score": round(float(s), 6), "class": int(c), "label": name(int(c))}
            for b, s, c in zip(d.boxes, d.scores, d.classes)]


def _confidence_of(dets: list[Detections], temperature: float) -> np.ndarray:
    """`Detect.confidence` of decoded detections."""
    out = np.ones(len(dets), np.float64)
    t = float(temperature) if temperature and temperature > 0 else 1.0
    for i, d in enumerate(dets):
        if len(d):
            s = np.clip(d.scores.astype(np.float64), _EPS, 1 - _EPS)
            p = 1.0 / (1.0 + np.exp(-np.log(s / (1 - s)) / t))
            out[i] = float(np.min(np.abs(2 * p - 1)))
    return out
