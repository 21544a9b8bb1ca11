"""`edgecore.detect` against straightforward reference implementations (plain Python loops).

The references share only the arithmetic's definition (float32 IoU, float32 sigmoid) with the code under
test, never its functions; each test also breaks the thing it checks and sees the comparison fail.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from edgecore.detect import DecodeParams, Detections, anchor_points, box_iou, decode, nms
from edgecore.errors import ConfigError, EdgeError, ModelError

F = np.float32


# ---------------------------------------------------------------- references


def ref_iou(a, b) -> float:
    """IoU of two boxes in float32 scalars, the textbook way."""
    ax1, ay1, ax2, ay2 = (F(v) for v in a)
    bx1, by1, bx2, by2 = (F(v) for v in b)
    iw = max(F(min(ax2, bx2) - max(ax1, bx1)), F(0))
    ih = max(F(min(ay2, by2) - max(ay1, by1)), F(0))
    inter = F(iw * ih)
    union = F(F(F((ax2 - ax1) * (ay2 - ay1)) + F((bx2 - bx1) * (by2 - by1))) - inter)
    return float(F(inter / union)) if union > 0 else 0.0


def ref_nms(boxes, scores, classes, thr, max_det, agnostic=False) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))  # stable: ties keep index order
    keep: list[int] = []
    for i in order:
        if len(keep) == max_det:
            break
        if all(
            ref_iou(boxes[i], boxes[k]) <= float(thr) or (not agnostic and classes[i] != classes[k]) for k in keep
        ):
            keep.append(i)
    return keep


def ref_decode(raw, p: DecodeParams) -> list[list[tuple]]:
    """Per image: [(x1, y1, x2, y2, score, class)] by the contract, one (location, class) pair at a time."""
    h, w = p.input_size
    locs = []
    for s in p.strides:
        for i in range(math.ceil(h / s)):
            for j in range(math.ceil(w / s)):
                locs.append(((j + 0.5) * s, (i + 0.5) * s, s))
    out = []
    for img in raw:
        cands = []  # (score, flat index, box, class)
        for a, (cx, cy, s) in enumerate(locs):
            for c in range(p.num_classes):
                score = F(1.0) / (F(1.0) + np.exp(-F(img[a, 4 + c]), dtype=F))
                if float(score) > p.score_threshold:  # compared exactly, as Python floats
                    l, t, r, b = (F(v) * F(s) for v in img[a, :4])
                    box = (
                        min(max(F(cx) - l, F(0)), F(w)),
                        min(max(F(cy) - t, F(0)), F(h)),
                        min(max(F(cx) + r, F(0)), F(w)),
                        min(max(F(cy) + b, F(0)), F(h)),
                    )
                    cands.append((score, a * p.num_classes + c, box, c))
        cands.sort(key=lambda x: (-x[0], x[1]))
        cands = sorted(cands[: p.pre_nms_top_k], key=lambda x: x[1])  # back to index order, as decode sees them
        keep = ref_nms([x[2] for x in cands], [x[0] for x in cands], [x[3] for x in cands], p.iou_threshold,
                       p.max_detections, p.class_agnostic)
        out.append([(*cands[k][2], cands[k][0], cands[k][3]) for k in keep])
    return out


def as_rows(d: Detections) -> list[tuple]:
    return [(*map(F, b), F(s), int(c)) for b, s, c in zip(d.boxes, d.scores, d.classes)]


def random_boxes(rng, n, *, grid=False):
    """Boxes in a 100x100 image; ``grid``: integer corners on a coarse grid (many exact ties and equal IoUs)."""
    if grid:
        xy = rng.integers(0, 8, (n, 2)) * 10
        wh = rng.integers(1, 5, (n, 2)) * 10
    else:
        xy = rng.uniform(0, 90, (n, 2))
        wh = rng.uniform(2, 40, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(F)


# ---------------------------------------------------------------- box_iou and nms


def test_box_iou_matches_the_reference_and_handles_empty_and_degenerate_boxes():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 7), random_boxes(rng, 5, grid=True)
    m = box_iou(a, b)
    assert m.shape == (7, 5) and m.dtype == np.float32
    assert [[float(v) for v in row] for row in m] == [[ref_iou(x, y) for y in b] for x in a]
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 5)
    point = np.array([[5, 5, 5, 5]], F)
    assert box_iou(point, point)[0, 0] == 0.0  # empty union: 0, not NaN
    assert box_iou([[0, 0, 10, 10]], [[0, 0, 10, 10]])[0, 0] == 1.0
    assert box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10]])[0, 0] == pytest.approx(1 / 3)


@pytest.mark.parametrize("agnostic", [False, True])
def test_nms_equals_the_reference_greedy_loop_on_many_seeds(agnostic):
    for seed in range(80):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(0, 160))
        grid = seed % 2 == 0  # exact ties in score and IoU exactly at the threshold
        boxes = random_boxes(rng, n, grid=grid)
        scores = (rng.integers(0, 5, n) / 4 if grid else rng.random(n)).astype(F)
        classes = rng.integers(0, 1 + seed % 4, n)
        thr = [0.5, 0.3, 0.0, 0.6, 1.0][seed % 5]
        max_det = int(rng.integers(1, 120))
        got = nms(boxes, scores, classes, thr, max_det, class_agnostic=agnostic)
        want = ref_nms(boxes, scores, classes, thr, max_det, agnostic)
        assert got.dtype == np.int64
        assert got.tolist() == want, f"seed {seed}"


def test_nms_resolves_long_suppression_chains_across_blocks():
    # a row of boxes, each overlapping only its neighbours: keep, drop, keep, drop, ... (the worst case for the
    # fixed point inside a block, and chains that cross block borders)
    x = np.arange(300, dtype=F) * 4
    boxes = np.stack([x, np.zeros_like(x), x + 10, np.full_like(x, 10)], 1)
    scores = np.linspace(1, 0.01, 300).astype(F)
    got = nms(boxes, scores, np.zeros(300, np.int64), 0.4, 1000)
    assert got.tolist() == ref_nms(boxes, scores, [0] * 300, 0.4, 1000)
    assert got.tolist() == list(range(0, 300, 2))


def test_nms_is_class_aware_and_cut_at_max_detections():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]], F)
    scores = np.array([0.9, 0.8, 0.7, 0.6], F)
    assert nms(boxes, scores, np.array([0, 1, 0, 0]), 0.5, 10).tolist() == [0, 1, 3]
    assert nms(boxes, scores, np.array([0, 1, 0, 0]), 0.5, 10, class_agnostic=True).tolist() == [0, 3]
    assert nms(boxes, scores, np.array([0, 1, 0, 0]), 0.5, 2).tolist() == [0, 1]
    assert nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0), 0.5, 10).tolist() == []


def test_the_nms_comparison_can_fail():
    """Sibling check: a plain score sort (no suppression) differs from the reference on the same inputs."""
    rng = np.random.default_rng(3)
    boxes, scores, classes = random_boxes(rng, 80), rng.random(80).astype(F), rng.integers(0, 2, 80)
    assert np.argsort(-scores, kind="stable").tolist() != ref_nms(boxes, scores, classes, 0.5, 100)


# ---------------------------------------------------------------- params


def test_decode_params_round_trip_and_derived_shapes():
    p = DecodeParams((320, 320), (8, 16, 32), 3)
    assert p.num_anchors == 2100 and p.channels == 7
    assert DecodeParams.from_dict(p.to_dict()) == p
    assert p.to_dict()["strides"] == [8, 16, 32]
    q = DecodeParams.from_dict({"input_size": [100, 60], "strides": [8, 32], "num_classes": 1, "class_agnostic": True})
    assert q.level_shapes == ((13, 8), (4, 2)) and q.class_agnostic is True
    assert hash(q) == hash(DecodeParams((100, 60), (8, 32), 1, class_agnostic=True))


@pytest.mark.parametrize(
    "change, field",
    [
        ({"input_size": [320]}, "input_size"),
        ({"input_size": [320, 0]}, "input_size"),
        ({"strides": [16, 8]}, "strides"),
        ({"strides": []}, "strides"),
        ({"strides": [8, 16.0]}, "strides"),
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": True}, "num_classes"),
        ({"score_threshold": 1.5}, "score_threshold"),
        ({"iou_threshold": "0.5"}, "iou_threshold"),
        ({"iou_threshold": float("nan")}, "iou_threshold"),
        ({"max_detections": 0}, "max_detections"),
        ({"pre_nms_top_k": 2.5}, "pre_nms_top_k"),
        ({"class_agnostic": "false"}, "class_agnostic"),
        ({"nms": 0.5}, "unknown key"),
    ],
)
def test_decode_params_refuse_bad_values_naming_the_field(change, field):
    good = {"input_size": [320, 320], "strides": [8, 16, 32], "num_classes": 3}
    DecodeParams.from_dict(good)  # the baseline is valid: the failure below is the change's
    with pytest.raises(ConfigError, match=field) as e:
        DecodeParams.from_dict({**good, **change})
    assert "\n" not in str(e.value)


def test_decode_params_need_their_keys():
    with pytest.raises(ConfigError, match="missing key.*'strides'"):
        DecodeParams.from_dict({"input_size": [8, 8], "num_classes": 1})
    with pytest.raises(ConfigError, match="mapping"):
        DecodeParams.from_dict([1, 2])


# ---------------------------------------------------------------- anchors and decode


def test_anchor_points_follow_the_contract_and_are_cached_read_only():
    p = DecodeParams((20, 12), (4, 8), 1)
    ctr, st = anchor_points(p)
    want = [((j + 0.5) * s, (i + 0.5) * s, s) for s in (4, 8) for i in range(math.ceil(20 / s)) for j in range(math.ceil(12 / s))]
    assert ctr.shape == (len(want), 2) and st.shape == (len(want),)
    assert [(float(x), float(y), float(s)) for (x, y), s in zip(ctr, st)] == want
    assert anchor_points(DecodeParams((20, 12), (4, 8), 1)) is anchor_points(p)
    with pytest.raises(ValueError):
        ctr[0, 0] = 1.0


def _raw(rng, p: DecodeParams, n: int, *, mean: float, ties: bool = False) -> np.ndarray:
    raw = np.empty((n, p.num_anchors, p.channels), F)
    raw[..., :4] = rng.uniform(0, 4, raw[..., :4].shape)
    logits = rng.normal(mean, 2.0, raw[..., 4:].shape)
    raw[..., 4:] = np.round(logits) if ties else logits  # rounded logits: many equal scores
    if ties:
        raw[..., :4] = np.round(raw[..., :4])  # equal boxes and exact IoUs
    return raw


@pytest.mark.parametrize(
    "params",
    [
        DecodeParams((32, 32), (8, 16), 3),
        DecodeParams((24, 40), (4, 8, 16), 1, score_threshold=0.3, iou_threshold=0.5, max_detections=7),
        DecodeParams((30, 30), (8, 16, 32), 2, pre_nms_top_k=20, class_agnostic=True),
        DecodeParams((16, 16), (4,), 4, iou_threshold=0.0, max_detections=3, pre_nms_top_k=5),
    ],
    ids=["plain", "one-class-cut", "agnostic-topk", "zero-iou"],
)
def test_decode_equals_the_reference_on_many_seeds(params):
    for seed in range(12):
        rng = np.random.default_rng(seed)
        raw = _raw(rng, params, 2, mean=[-2.0, -4.0, 0.0][seed % 3], ties=seed % 2 == 1)
        got, want = decode(raw, params), ref_decode(raw, params)
        assert len(got) == 2
        for d, w in zip(got, want):
            assert d.boxes.dtype == np.float32 and d.scores.dtype == np.float32 and d.classes.dtype == np.int64
            assert d.boxes.shape == (len(d), 4)
            assert as_rows(d) == w, f"seed {seed}"
            assert np.all(np.diff(d.scores) <= 0)  # best first
            assert len(d) <= params.max_detections


def test_decode_maps_distances_to_pixels_by_the_stride_and_clips():
    p = DecodeParams((32, 32), (8, 16), 2, score_threshold=0.5)
    raw = np.zeros((1, p.num_anchors, 6), F)
    raw[..., 4:] = -10.0
    raw[0, 5, :] = [0.5, 1.0, 1.5, 2.0, 4.0, -10]  # level 8, row 1, col 1: centre (12, 12)
    raw[0, 16, :] = [10, 10, 0.25, 0.5, -10, 3.0]  # level 16, first location: centre (8, 8), clipped at 0
    (d,) = decode(raw, p)
    assert d.classes.tolist() == [0, 1]
    np.testing.assert_array_equal(d.boxes, [[8, 4, 24, 28], [0, 0, 12, 16]])
    np.testing.assert_allclose(d.scores, 1 / (1 + np.exp([-4.0, -3.0])), rtol=1e-6)


def test_decode_empty_inputs_and_nothing_above_the_threshold():
    p = DecodeParams((32, 32), (8, 16), 3)
    assert decode(np.zeros((0, p.num_anchors, 7), F), p) == []
    raw = np.full((3, p.num_anchors, 7), -20.0, F)
    out = decode(raw, p)
    assert [len(d) for d in out] == [0, 0, 0]
    assert out[0].boxes.shape == (0, 4) and out[0].classes.dtype == np.int64
    single = decode(raw[0], p)  # one image without its batch dimension
    assert len(single) == 1


def test_decode_refuses_an_output_that_does_not_match_the_params():
    p = DecodeParams((32, 32), (8, 16), 3)
    assert len(decode(np.zeros((1, 20, 7), F), p)) == 1  # 16 + 4 locations, 4 + 3 channels: accepted
    with pytest.raises(ModelError, match=r"shape \(1, 21, 7\).*\(N, 20, 7\)") as e:
        decode(np.zeros((1, 21, 7), F), p)
    assert isinstance(e.value, EdgeError) and "\n" not in str(e.value)
    with pytest.raises(ModelError, match="3 classes"):
        decode(np.zeros((1, 20, 8), F), p)
    with pytest.raises(ModelError):
        decode(np.zeros((20,), F), p)


def test_the_decode_comparison_can_fail():
    """Sibling check: the reference sees a changed stride convention (centre without the +0.5)."""
    p = DecodeParams((32, 32), (8, 16), 3)
    raw = _raw(np.random.default_rng(1), p, 1, mean=-1.0)
    shifted = raw.copy()
    shifted[0, :, 0] += 0.0625  # every box's left side moves half a pixel at stride 8
    assert [as_rows(d) for d in decode(shifted, p)] != ref_decode(raw, p)


def test_decode_of_a_320_frame_is_fast():
    p = DecodeParams((320, 320), (8, 16, 32), 3)
    ctr, st = anchor_points(p)
    rng = np.random.default_rng(0)
    raw = np.empty((1, p.num_anchors, 7), F)
    raw[..., :4] = rng.uniform(0.5, 3, (1, p.num_anchors, 4))
    raw[..., 4:] = rng.normal(-6, 1.0, (1, p.num_anchors, 3))
    for _ in range(8):  # objects: nearby locations agree on a box, scores fall with the distance
        c, half = rng.uniform(20, 300, 2), rng.uniform(10, 50, 2)
        box = np.r_[c - half, c + half]
        dist = np.linalg.norm(ctr - c, axis=1)
        near = dist < half.min()
        d = np.c_[ctr[near] - box[:2], box[2:] - ctr[near]] / st[near, None]
        raw[0, near, :4] = np.abs(d * rng.normal(1, 0.08, d.shape))
        raw[0, near, 4 + rng.integers(3)] = 3 - dist[near] / 6 + rng.normal(0, 0.5, near.sum())
    (d,) = decode(raw, p)
    assert 8 <= len(d) <= 100
    best = min(_timed(lambda: decode(raw, p), 30) for _ in range(5))
    # a few milliseconds even on a loaded shared CPU; about half a millisecond on an idle core
    assert best < 5e-3, f"decode took {best * 1e3:.2f} ms"


def _timed(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


@pytest.mark.parametrize("thr", [0.0, 1e-7, 0.05, 0.5, 0.9, 0.99999994, 1.0 - 1e-9, 1.0])
def test_decode_takes_exactly_the_pairs_whose_sigmoid_passes_the_threshold(thr):
    """decode skips the sigmoid of logits below a bound: no pair near the threshold, or saturated, may be lost."""
    p = DecodeParams((16, 16), (8,), 64, score_threshold=thr, iou_threshold=1.0, max_detections=256, pre_nms_top_k=256)
    rng = np.random.default_rng(0)
    t = min(max(thr, 1e-12), 1 - 1e-12)
    at = np.float32(np.log(t) - np.log1p(-t))
    near = [np.float32(at)]
    for _ in range(40):  # float32 steps either side of the threshold's logit
        near = [np.nextafter(near[0], F(-np.inf)), *near, np.nextafter(near[-1], F(np.inf))]
    pool = np.concatenate([np.array(near, F), F([16.6, 17.0, 20.0, 88.0, -88.0, 0.0]), rng.normal(at, 0.01, 50).astype(F)])
    raw = np.zeros((1, p.num_anchors, 4 + 64), F)
    raw[..., :4] = 1.0
    raw[0, :, 4:] = rng.choice(pool, (p.num_anchors, 64))
    (d,) = decode(raw, p)
    scores = F(1.0) / (F(1.0) + np.exp(-raw[0, :, 4:], dtype=F))
    want = sorted(scores[scores.astype(np.float64) > thr].tolist(), reverse=True)  # compared as Python floats
    assert len(d) == len(want) and d.scores.tolist() == want
