"""Detection metrics: COCO mAP through pycocotools' COCOeval, and box agreement between two models.

`evaluate` is the accuracy a detector is trained, gated and reported by; `box_agreement` is how closely an
artifact reproduces its reference (the build gate's comparison), class by class and box by box.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Sequence

import numpy as np

from edgecore.detect import Detections, box_iou
from edgecore.errors import DataError
from toolchain.detection.data import DetectionSet

__all__ = ["evaluate", "box_agreement"]


def evaluate(
    predictions: Sequence[Detections],
    targets: DetectionSet | Sequence[Detections],
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """COCO box metrics of ``predictions`` (one `Detections` per image) against ``targets``.

    ``targets``: a `DetectionSet`, or one `Detections` per image (scores ignored) with ``labels`` naming the
    classes. Returns ``map`` (AP averaged over IoU 0.50:0.05:0.95), ``map50``, ``map75``, ``per_class`` and
    ``per_class50`` (``{label: AP}``; None for a class without ground truth, which the means leave out),
    ``images`` and ``objects``. Up to 100 detections per image count, as in COCO.
    """
    if isinstance(targets, DetectionSet):
        gt = targets
        labels = targets.labels if labels is None else tuple(labels)
        size = targets.image_size
    else:
        if labels is None:
            raise DataError("evaluate: targets given as Detections need labels (the class names)")
        labels = tuple(labels)
        size = None
        gt = None
    truth = gt.targets() if gt is not None else list(targets)
    if len(predictions) != len(truth):
        raise DataError(f"evaluate: {len(predictions)} predictions for {len(truth)} images")
    n_obj = int(sum(len(t) for t in truth))
    result: dict[str, Any] = {"images": len(truth), "objects": n_obj}
    ids = [k + 1 for k in range(len(labels))]
    gt_dict = _coco_ground_truth(truth, labels, size)
    dets = _coco_detections(predictions)
    if n_obj == 0 or len(dets) == 0:  # COCOeval cannot load empty results: nothing found scores 0
        present = {int(c) for t in truth for c in t.classes}
        per = {name: (0.0 if k in present else None) for k, name in enumerate(labels)}
        return {**result, "map": 0.0, "map50": 0.0, "map75": 0.0, "per_class": per, "per_class50": dict(per)}

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.catIds = ids
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"]  # [IoU thresholds, recall points, classes, area ranges, max dets]
    p_all = prec[:, :, :, 0, -1]  # every area, 100 detections

    def ap(p: np.ndarray) -> float | None:
        valid = p[p > -1]
        return float(valid.mean()) if valid.size else None

    iou50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    iou75 = int(np.argmin(np.abs(ev.params.iouThrs - 0.75)))
    per = {name: ap(p_all[:, :, k]) for k, name in enumerate(labels)}
    per50 = {name: ap(p_all[iou50, :, k]) for k, name in enumerate(labels)}
    return {
        **result,
        "map": ap(p_all) or 0.0,
        "map50": ap(p_all[iou50]) or 0.0,
        "map75": ap(p_all[iou75]) or 0.0,
        "per_class": per,
        "per_class50": per50,
    }


def _coco_ground_truth(truth: Sequence[Detections], labels: Sequence[str], size: tuple[int, int] | None) -> dict[str, Any]:
    images, anns = [], []
    for i, t in enumerate(truth):
        b = np.asarray(t.boxes, np.float64).reshape(-1, 4)
        if size is not None:
            h, w = size
        else:  # no image size given: one that holds the boxes (COCOeval does not use it for boxes)
            w = float(b[:, 2].max()) if len(b) else 1.0
            h = float(b[:, 3].max()) if len(b) else 1.0
        images.append({"id": i + 1, "width": w, "height": h})
        for box, c in zip(b, np.asarray(t.classes).reshape(-1)):
            if not 0 <= int(c) < len(labels):
                raise DataError(f"evaluate: image {i} has class {int(c)} but {len(labels)} labels")
            bw, bh = float(box[2] - box[0]), float(box[3] - box[1])
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c) + 1,
                         "bbox": [float(box[0]), float(box[1]), bw, bh], "area": bw * bh, "iscrowd": 0})
    cats = [{"id": k + 1, "name": str(name)} for k, name in enumerate(labels)]
    return {"images": images, "annotations": anns, "categories": cats}


def _coco_detections(predictions: Sequence[Detections]) -> np.ndarray:
    """``[image_id, x, y, w, h, score, category_id]`` rows (the array form ``COCO.loadRes`` takes)."""
    rows = []
    for i, p in enumerate(predictions):
        b = np.asarray(p.boxes, np.float64).reshape(-1, 4)
        if not len(b):
            continue
        r = np.empty((len(b), 7), np.float64)
        r[:, 0] = i + 1
        r[:, 1:3] = b[:, :2]
        r[:, 3:5] = b[:, 2:] - b[:, :2]
        r[:, 5] = np.asarray(p.scores, np.float64).reshape(-1)
        r[:, 6] = np.asarray(p.classes).reshape(-1) + 1
        rows.append(r)
    return np.concatenate(rows) if rows else np.zeros((0, 7))


def box_agreement(reference: Sequence[Detections], candidate: Sequence[Detections], iou: float = 0.9) -> float:
    """Share of ``reference``'s boxes that ``candidate`` reproduces: same class and IoU >= ``iou``.

    Per image, reference boxes in decreasing score take, one each, the unmatched candidate box of their class
    with the highest IoU (greedy, as COCO matches). Extra candidate boxes do not count; call it both ways for
    a symmetric view. 1.0 when the reference has no boxes at all.
    """
    if len(reference) != len(candidate):
        raise DataError(f"box_agreement: {len(reference)} reference images but {len(candidate)} candidate images")
    total = matched = 0
    for ref, cand in zip(reference, candidate):
        total += len(ref)
        if not len(ref) or not len(cand):
            continue
        m = box_iou(ref.boxes, cand.boxes)
        m[np.asarray(ref.classes)[:, None] != np.asarray(cand.classes)[None, :]] = -1.0
        free = np.ones(m.shape[1], bool)
        for r in np.argsort(-np.asarray(ref.scores), kind="stable"):  # one pass per reference box
            row = np.where(free, m[r], -1.0)
            j = int(np.argmax(row))
            if row[j] >= iou:
                free[j] = False
                matched += 1
    return 1.0 if total == 0 else matched / total
