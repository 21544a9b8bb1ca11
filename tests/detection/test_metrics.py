"""mAP through COCOeval and box agreement: perfect scores where they must be, less where boxes move."""

from __future__ import annotations

import numpy as np
import pytest

from edgecore.detect import Detections
from edgecore.errors import DataError
from toolchain.detection.metrics import box_agreement, evaluate
from toolchain.detection.shapes import generate


@pytest.fixture(scope="module")
def ds():
    return generate(12, seed=4)


def _shifted(ds, dx: float) -> list[Detections]:
    return [Detections(b + np.float32(dx), np.linspace(1, 0.5, len(b)).astype(np.float32), c) for b, c in zip(ds.boxes, ds.classes)]


def test_perfect_predictions_score_one(ds):
    r = evaluate(ds.targets(), ds)
    assert r["map"] == r["map50"] == r["map75"] == 1.0
    assert r["per_class"] == {name: 1.0 for name in ds.labels}
    assert r["images"] == 12 and r["objects"] == ds.num_objects


def test_moved_boxes_score_less_the_further_they_move(ds):
    small, large = evaluate(_shifted(ds, 2), ds), evaluate(_shifted(ds, 6), ds)
    assert 0 < large["map"] < small["map"] < 1.0
    assert large["map50"] <= small["map50"] <= 1.0
    assert evaluate(_shifted(ds, 60), ds)["map"] == 0.0


def test_a_hand_computed_average_precision():
    """One image, two objects; found: one exactly (score 0.9), plus a false alarm (0.8). COCO's 101-point
    interpolated precision is 1 up to recall 0.5 and 0 after, at every IoU threshold: AP = 51/101."""
    truth = [Detections(np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), np.ones(2, np.float32), np.zeros(2, np.int64))]
    pred = [Detections(np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32), np.array([0.9, 0.8], np.float32), np.zeros(2, np.int64))]
    r = evaluate(pred, truth, labels=["thing"])
    assert r["map"] == pytest.approx(51 / 101) and r["map50"] == pytest.approx(51 / 101)
    # the false alarm ranked first costs precision at recall 0.5: the score order matters
    worse = [Detections(pred[0].boxes, np.array([0.8, 0.9], np.float32), pred[0].classes)]
    assert evaluate(worse, truth, labels=["thing"])["map"] == pytest.approx(0.5 * 51 / 101)


def test_wrong_classes_missing_classes_and_empty_predictions(ds):
    swapped = [Detections(t.boxes, t.scores, (t.classes + 1) % 4) for t in ds.targets()]
    assert evaluate(swapped, ds)["map"] == 0.0
    only_circles = [t.take(t.classes == 0) for t in ds.targets()]
    r = evaluate(only_circles, ds)
    assert r["per_class"]["circle"] == 1.0 and r["per_class"]["star"] == 0.0
    assert r["map"] == pytest.approx(0.25)
    empty = evaluate([Detections.empty() for _ in range(12)], ds)
    assert empty["map"] == 0.0 and empty["per_class"]["circle"] == 0.0


def test_a_class_without_ground_truth_is_left_out_of_the_mean(ds):
    no_stars = ds.subset([i for i in range(len(ds)) if 3 not in ds.classes[i]])
    r = evaluate(no_stars.targets(), no_stars)
    assert r["per_class"]["star"] is None and r["map"] == 1.0


def test_evaluate_checks_its_inputs(ds):
    with pytest.raises(DataError, match="11 predictions for 12 images"):
        evaluate(ds.targets()[:11], ds)
    with pytest.raises(DataError, match="need labels"):
        evaluate(ds.targets(), ds.targets())
    with pytest.raises(DataError, match="class 3 but 2 labels"):
        evaluate(ds.targets(), ds.targets(), labels=["a", "b"])


def test_evaluate_prints_nothing(ds, capsys):
    evaluate(_shifted(ds, 2), ds)
    assert capsys.readouterr().out == ""


def test_box_agreement(ds):
    ref = ds.targets()
    assert box_agreement(ref, ref) == 1.0
    # a tenth of a pixel: every box still overlaps its twin at IoU >= 0.9
    assert box_agreement(ref, _shifted(ds, 0.1)) == 1.0
    assert box_agreement(ref, _shifted(ds, 8)) == 0.0
    swapped = [Detections(t.boxes, t.scores, (t.classes + 1) % 4) for t in ref]
    assert box_agreement(ref, swapped) == 0.0
    half = [t.take(slice(0, len(t) // 2)) for t in ref]
    n_half = sum(len(t) for t in half)
    assert box_agreement(ref, half) == pytest.approx(n_half / ds.num_objects)
    assert box_agreement(half, ref) == 1.0  # extra candidate boxes do not count
    # one candidate box cannot match two identical reference boxes
    dup = [Detections(np.repeat(ref[0].boxes[:1], 2, 0), np.ones(2, np.float32), np.repeat(ref[0].classes[:1], 2))]
    assert box_agreement(dup, [ref[0].take(slice(0, 1))]) == 0.5
    assert box_agreement([Detections.empty()], [Detections.empty()]) == 1.0
    with pytest.raises(DataError, match="2 reference images but 1"):
        box_agreement(ref[:2], ref[:1])


def test_box_agreement_threshold():
    a = [Detections(np.array([[0, 0, 100, 100]], np.float32), np.ones(1, np.float32), np.zeros(1, np.int64))]
    b = [Detections(np.array([[0, 0, 100, 95]], np.float32), np.ones(1, np.float32), np.zeros(1, np.int64))]  # IoU 0.95
    assert box_agreement(a, b) == 1.0 and box_agreement(a, b, iou=0.96) == 0.0
