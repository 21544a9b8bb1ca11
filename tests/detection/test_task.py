"""The ``detect`` task plug-in: its contract half on hand-made raw outputs (numpy), and the training half's
flip augmentation, gate and representative set."""

from __future__ import annotations

import numpy as np
import pytest

from edgecore.detect import DecodeParams
from edgecore.errors import ConfigError
from edgecore.spec import Precision
from edgecore.tasks import TaskSpec, get_task

PARAMS = DecodeParams(input_size=(32, 32), strides=(8, 16, 32), num_classes=2)  # A = 16 + 4 + 1 = 21
SPEC = TaskSpec("detect", PARAMS.to_dict())
LOC = 5  # level 0, row 1, column 1: centre (12, 12)


def raw_with(logit: float, cls: int = 0, n: int = 1) -> np.ndarray:
    """``n`` images with one box [4, 4, 20, 20] of class ``cls`` scored sigmoid(``logit``), nothing else."""
    raw = np.zeros((n, PARAMS.num_anchors, PARAMS.channels), np.float32)
    raw[:, :, 4:] = -10.0
    raw[:, LOC, :4] = 1.0  # one stride on each side
    raw[:, LOC, 4 + cls] = logit
    return raw


def targets(*objects: tuple[int, float, float, float, float]) -> np.ndarray:
    y = np.full((1, max(1, len(objects)), 5), -1, np.float32)
    for k, o in enumerate(objects):
        y[0, k] = o
    return y


def test_params_are_the_manifests_decode_block():
    assert get_task(SPEC).params == PARAMS
    with pytest.raises(ConfigError, match=r"task 'detect': decode: missing key\(s\) 'input_size'"):
        get_task({"name": "detect", "params": {}})
    with pytest.raises(ConfigError, match=r"decode\.strides: must be strictly increasing"):
        get_task({"name": "detect", "params": {**PARAMS.to_dict(), "strides": [16, 8, 32]}})


def test_quality_is_the_images_ap_at_iou_half():
    task = get_task(SPEC)
    assert task.quality(raw_with(4.0), targets((0, 4, 4, 20, 20))).tolist() == [1.0]
    assert task.quality(raw_with(4.0), targets((1, 4, 4, 20, 20))).tolist() == [0.0]  # wrong class
    assert task.quality(raw_with(4.0), targets((0, 4, 4, 20, 20), (1, 22, 22, 30, 30))).tolist() == [0.5]
    assert task.quality(raw_with(4.0), targets((0, 14, 14, 30, 30))).tolist() == [0.0]  # IoU below 0.5
    assert task.quality(raw_with(-10.0), targets()).tolist() == [1.0]  # nothing there, nothing found


def test_confidence_is_lowest_for_a_coin_toss_box():
    task = get_task(SPEC)
    sure, toss, empty = (task.confidence(raw_with(z), measure="max_prob", temperature=1.0)[0] for z in (4.0, 0.1, -10))
    assert toss < 0.1 < 0.9 < sure <= empty == 1.0
    softer = task.confidence(raw_with(4.0), measure="max_prob", temperature=2.0)[0]
    assert softer < sure  # a temperature above 1 softens the scores


def test_answer_lists_the_detections():
    ans = get_task(SPEC).answer(raw_with(4.0)[0], ["circle", "square"])
    assert ans == {"detections": [{"box": [4.0, 4.0, 20.0, 20.0], "score": pytest.approx(0.982014, abs=1e-6),
                                   "class": 0, "label": "circle"}]}


def test_flip_augmentation_moves_the_boxes_with_the_pixels():
    import torch

    from toolchain.engine import FitOptions
    from toolchain.tasks import get_train_task

    task = get_train_task(SPEC)
    x = torch.zeros(8, 1, 32, 32)
    x[:, :, 4:20, 2:10] = 1.0
    y = torch.full((8, 2, 5), -1.0)
    y[:, 0] = torch.tensor([1.0, 2, 4, 10, 20])
    torch.manual_seed(0)
    xa, ya = task.augment(x, y, FitOptions(epochs=1, lr=1e-3, augment=True))
    flipped = xa[:, 0, 10, 25] > 0
    assert 0 < int(flipped.sum()) < 8
    for i in range(8):
        cols = torch.nonzero(xa[i, 0].sum(0)).flatten()
        assert ya[i, 0].tolist() == [1.0, float(cols.min()), 4.0, float(cols.max() + 1), 20.0]
        assert ya[i, 1].tolist() == [-1.0] * 5  # padding stays padding
    assert torch.equal(y[:, 0, 1], torch.full((8,), 2.0))  # the caller's batch is not changed


def test_the_gate_reads_map_points_and_box_agreement():
    from toolchain.tasks import get_train_task

    task = get_train_task(SPEC)
    ref = raw_with(4.0, n=4)
    y = np.repeat(targets((0, 4, 4, 20, 20)), 4, axis=0)
    same = task.compare(ref.copy(), ref, y, precision=Precision.FP32, budget_pt=1.0)
    assert same.passed and same.accuracy == same.reference_accuracy > 0.5 and same.agreement == 1.0
    moved = ref.copy()
    moved[1:, LOC, :4] = 1.6  # three of four boxes too large: mAP and agreement fall
    res = task.compare(moved, ref, y, precision=Precision.INT8, budget_pt=1.0)
    assert res.gate_failed and "below the PyTorch reference" in res.problems[0]
    assert res.agreement == 0.25 and res.mismatch_count == 3
    fp32 = task.compare(moved, ref, y, precision=Precision.FP32, budget_pt=100.0)
    assert not fp32.gate_failed and "reproduces 25.00% of the PyTorch reference's boxes" in fp32.problems[0]


def test_the_representative_set_without_classes_is_a_seeded_draw(tmp_path):
    from calibration.representative import build_representative_set
    from toolchain.tasks import get_train_task

    x = np.arange(40, dtype=np.float32).reshape(10, 1, 2, 2)
    labels = get_train_task(SPEC).representative_labels(np.zeros((10, 3, 5), np.float32))
    assert labels is None
    a = build_representative_set(inputs=x, labels=labels, n=4, path=tmp_path / "r.npz")
    b = build_representative_set(inputs=x, labels=labels, n=4, path=tmp_path / "r.npz")
    assert a.method == "random" and a.sha256 == b.sha256 and len(a) == 4 and (a.labels == -1).all()
