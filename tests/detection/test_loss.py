"""Target assignment, the detection loss and the distillation loss, on hand-made boxes and raw outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgecore.detect import DecodeParams, anchor_points
from edgecore.errors import ConfigError, DataError, ModelError
from toolchain.detection.loss import (
    LossConfig,
    assign,
    decode_boxes,
    detection_loss,
    distillation_loss,
    giou,
)

P64 = DecodeParams(input_size=(64, 64), strides=(8, 16, 32), num_classes=3)
P128 = DecodeParams(input_size=(128, 128), strides=(8, 16, 32), num_classes=3)


def _level(params: DecodeParams) -> np.ndarray:
    return np.repeat(np.arange(len(params.strides)), [h * w for h, w in params.level_shapes])


def _perfect_raw(targets, params: DecodeParams, *, logit: float = 8.0) -> torch.Tensor:
    """A raw output that predicts every positive's box exactly, with a confident logit for its class."""
    a = assign(targets, params)
    centres, strides = (torch.from_numpy(v.copy()) for v in anchor_points(params))
    raw = torch.full((len(targets), params.num_anchors, params.channels), -logit)
    b = a.boxes
    ltrb = torch.stack([centres[:, 0] - b[..., 0], centres[:, 1] - b[..., 1], b[..., 2] - centres[:, 0],
                        b[..., 3] - centres[:, 1]], -1) / strides[:, None]
    raw[..., :4] = torch.where(a.positive[..., None], ltrb.clamp(min=0), torch.ones(1))
    n, loc = torch.nonzero(a.positive, as_tuple=True)
    raw[n, loc, 4 + a.classes[a.positive]] = logit
    return raw


def test_positives_lie_inside_their_box_near_its_centre():
    boxes = np.array([[4, 6, 30, 28], [34, 30, 60, 62], [10, 40, 28, 58]], np.float32)
    targets = [(boxes, np.array([0, 1, 2])), (boxes[:1] + 10, np.array([2]))]
    a = assign(targets, P64)
    centres, strides = anchor_points(P64)
    assert a.positive.shape == (2, P64.num_anchors)
    for n, (bx, cl) in enumerate(targets):
        pos = a.positive[n].numpy()
        assert pos.any()
        matched = a.boxes[n].numpy()[pos]
        c, s = centres[pos], strides[pos]
        assert np.all((c[:, 0] > matched[:, 0]) & (c[:, 0] < matched[:, 2]) & (c[:, 1] > matched[:, 1]) & (c[:, 1] < matched[:, 3]))
        mid = (matched[:, :2] + matched[:, 2:]) / 2
        assert np.all(np.abs(c - mid) < 1.5 * s[:, None])  # centre sampling
        # every box has positives, each matched with its own class
        for k in range(len(bx)):
            mine = np.all(matched == bx[k], axis=1)
            assert mine.any()
            assert set(a.classes[n].numpy()[pos][mine]) == {int(cl[k])}
    assert np.all(a.classes.numpy()[~a.positive.numpy()] == -1)


def test_a_location_claimed_by_two_boxes_takes_the_smaller():
    big, small = [8, 8, 56, 56], [20, 20, 36, 36]
    a = assign([(np.array([big, small], np.float32), np.array([0, 1]))], P64)
    centres, _ = anchor_points(P64)
    inside_small = (centres[:, 0] > 20) & (centres[:, 0] < 36) & (centres[:, 1] > 20) & (centres[:, 1] < 36)
    pos = a.positive[0].numpy()
    assert np.all(a.classes[0].numpy()[pos & inside_small & (_level(P64) == 0)] == 1)


def test_large_boxes_go_to_coarse_levels_and_small_ones_to_fine():
    a = assign([(np.array([[10, 10, 118, 118]], np.float32), np.array([0])),
                (np.array([[50, 50, 66, 66]], np.float32), np.array([0]))], P128)
    lvl = _level(P128)
    assert set(lvl[a.positive[0].numpy()]) <= {1, 2} and a.positive[0].any()
    assert set(lvl[a.positive[1].numpy()]) == {0}
    # a larger range scale keeps the large box on the finer levels
    wide = assign([(np.array([[10, 10, 118, 118]], np.float32), np.array([0]))], P128, LossConfig(range_scale=16))
    assert set(lvl[wide.positive[0].numpy()]) == {0}


def test_a_box_between_location_centres_still_gets_one_positive():
    tiny = np.array([[9, 9, 15, 15]], np.float32)  # 6 px: holds one stride-8 centre, (12, 12)
    between = np.array([[14, 14, 19, 19]], np.float32)  # contains no centre of any level
    a = assign([(tiny, np.array([1])), (between, np.array([2]))], P64)
    assert int(a.positive[0].sum()) >= 1
    assert int(a.positive[1].sum()) == 1
    loc = int(torch.nonzero(a.positive[1])[0, 0])
    centres, strides = anchor_points(P64)
    assert strides[loc] == 8 and tuple(centres[loc]) == (20.0, 20.0)  # the cell holding the box's centre (16.5, 16.5)
    assert int(a.classes[1, loc]) == 2


def test_images_without_objects_have_no_positives():
    a = assign([(np.zeros((0, 4), np.float32), np.zeros(0, np.int64)), (np.array([[4, 4, 40, 40]], np.float32), [0])], P64)
    assert not a.positive[0].any() and a.positive[1].any()


def test_perfect_predictions_cost_little_and_wrong_ones_more():
    targets = [(np.array([[4, 6, 30, 28], [34, 30, 60, 62]], np.float32), np.array([0, 2]))]
    perfect = _perfect_raw(targets, P64)
    loss, parts = detection_loss(perfect, targets, P64)
    assert parts["box"] < 1e-4 and parts["cls"] < 1e-3 and parts["positives"] > 2
    wrong_class = perfect.clone()
    wrong_class[..., 4:] = wrong_class[..., [5, 6, 4]]
    shifted = perfect.clone()
    shifted[..., :2] += 1.0
    for bad in (wrong_class, shifted, torch.zeros_like(perfect)):
        assert float(detection_loss(bad, targets, P64)[0]) > float(loss) + 0.5


def test_class_targets_follow_box_quality_when_iou_aware():
    targets = [(np.array([[4, 6, 30, 28]], np.float32), np.array([0]))]
    raw = _perfect_raw(targets, P64)
    raw[..., :4] *= 0.5  # boxes at a quarter of the area: IoU 0.25, so a confident logit is over-confident
    aware = detection_loss(raw, targets, P64)[1]["cls"]
    plain = detection_loss(raw, targets, P64, LossConfig(iou_aware=False))[1]["cls"]
    assert aware > 10 * plain


def test_the_loss_trains_raw_outputs_toward_the_targets():
    targets = [(np.array([[4, 6, 30, 28]], np.float32), np.array([1])), (np.array([[20, 20, 50, 44]], np.float32), np.array([2]))]
    raw = torch.zeros(2, P64.num_anchors, P64.channels)
    raw[..., :4] = 1.0
    raw.requires_grad_(True)
    opt = torch.optim.Adam([raw], lr=0.05)
    first = None
    for _ in range(150):
        loss, _ = detection_loss(raw, targets, P64)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.2 * first


def test_giou_of_known_boxes():
    a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]])
    b = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [20, 0, 30, 10]])
    g, iou = giou(a, b)
    torch.testing.assert_close(iou, torch.tensor([1.0, 1 / 3, 0.0]))
    torch.testing.assert_close(g, torch.tensor([1.0, 1 / 3, -1 / 3]))


def test_decode_boxes_matches_the_contract():
    raw = torch.zeros(1, P64.num_anchors, P64.channels)
    raw[0, 0, :4] = torch.tensor([0.5, 0.5, 1.0, 2.0])  # the first location: centre (4, 4), stride 8
    torch.testing.assert_close(decode_boxes(raw, P64)[0, 0], torch.tensor([0.0, 0.0, 12.0, 20.0]))


def test_bad_inputs_fail_with_clear_errors():
    raw = torch.zeros(1, P64.num_anchors, P64.channels)
    with pytest.raises(ModelError, match=r"decode params expect \(N, 84, 7\)"):
        detection_loss(raw[:, :10], [(np.zeros((0, 4)), np.zeros(0))], P64)
    with pytest.raises(DataError, match="class 3, outside 0..2"):
        detection_loss(raw, [(np.array([[0, 0, 9, 9]]), np.array([3]))], P64)
    with pytest.raises(DataError, match="2 target entries for a batch of 1"):
        detection_loss(raw, [(np.zeros((0, 4)), np.zeros(0))] * 2, P64)
    with pytest.raises(ConfigError, match="center_radius must be > 0"):
        LossConfig(center_radius=0)
    with pytest.raises(DataError, match="no targets were given"):
        distillation_loss(raw, raw, None, P64, alpha=0.5)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        distillation_loss(raw, raw, None, P64, alpha=1.0, temperature=0)


def test_distillation_is_zero_when_the_student_is_the_teacher():
    targets = [(np.array([[4, 6, 30, 28], [34, 30, 60, 62]], np.float32), np.array([0, 2]))]
    teacher = _perfect_raw(targets, P64, logit=3.0)
    teacher[..., 4:] += torch.randn(teacher.shape[:2] + (3,), generator=torch.Generator().manual_seed(0)) * 0.5
    loss, parts = distillation_loss(teacher.clone(), teacher, None, P64, alpha=1.0, temperature=2.0)
    assert parts["confident"] > 0
    assert abs(parts["soft"]) < 1e-5 and abs(parts["box_kd"]) < 1e-5 and abs(float(loss)) < 1e-4

    student = teacher.clone()
    student[..., 4:] = -student[..., 4:]
    student[..., :4] *= 0.7
    _, off = distillation_loss(student, teacher, None, P64, alpha=1.0)
    assert off["soft"] > 0.5 and off["box_kd"] > 0.1

    # alpha mixes in the ground truth: at alpha 0 only detection_loss is left
    mixed, mp = distillation_loss(student, teacher, targets, P64, alpha=0.0)
    torch.testing.assert_close(mixed, detection_loss(student, targets, P64)[0])
    assert {"soft", "box_kd", "cls", "box"} <= set(mp)


def test_distillation_pulls_the_student_toward_the_teacher():
    targets = [(np.array([[4, 6, 30, 28]], np.float32), np.array([1]))]
    teacher = _perfect_raw(targets, P64, logit=4.0)
    student = torch.zeros_like(teacher)
    student[..., :4] = 1.0
    student.requires_grad_(True)
    opt = torch.optim.Adam([student], lr=0.05)
    for _ in range(100):
        loss, _ = distillation_loss(student, teacher, None, P64, alpha=1.0, score_threshold=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    agree = (torch.sigmoid(student[..., 4:]) > 0.5) == (torch.sigmoid(teacher[..., 4:]) > 0.5)
    assert bool(agree.all())
    pos = torch.sigmoid(teacher[..., 4:]).amax(-1) > 0.5
    assert float(giou(decode_boxes(student.detach(), P64)[pos], decode_boxes(teacher, P64)[pos])[1].min()) > 0.8
