"""DetectionSet: indexing, subsets, seeded splits, concatenation, COCO export and its own checks."""

from __future__ import annotations

import numpy as np
import pytest

from edgecore.errors import ConfigError, DataError
from toolchain.detection.data import DetectionSet
from toolchain.detection.shapes import generate


@pytest.fixture(scope="module")
def ds() -> DetectionSet:
    return generate(20, size=32, seed=9)


def test_index_iterate_and_subset(ds):
    img, boxes, classes = ds[3]
    assert img.shape == (3, 32, 32) and boxes.shape == (len(classes), 4)
    assert len(list(ds)) == 20 and ds.image_size == (32, 32) and ds.num_classes == 4
    sub = ds.subset([5, 2])
    assert len(sub) == 2 and np.array_equal(sub.images[0], ds.images[5]) and np.array_equal(sub.boxes[1], ds.boxes[2])
    assert len(ds.subset(slice(0, 4))) == 4
    mask = np.zeros(20, bool)
    mask[[1, 7]] = True
    assert np.array_equal(ds.subset(mask).images, ds.images[[1, 7]])


def test_split_is_seeded_disjoint_and_complete(ds):
    tr, va, te = ds.split(0.2, 0.25, seed=0)
    assert (len(tr), len(va), len(te)) == (11, 4, 5)
    again = ds.split(0.2, 0.25, seed=0)
    assert all(np.array_equal(a.images, b.images) for a, b in zip((tr, va, te), again))
    other = ds.split(0.2, 0.25, seed=1)
    assert not np.array_equal(other[2].images, te.images)
    key = lambda d: {d.images[i].tobytes() for i in range(len(d))}  # noqa: E731
    assert key(tr) | key(va) | key(te) == key(ds) and not key(tr) & key(te) and not key(va) & key(te)
    with pytest.raises(ConfigError, match="sum below 1"):
        ds.split(0.6, 0.5, seed=0)
    with pytest.raises(DataError, match="at least 3"):
        ds.subset([0, 1]).split(0.2, 0.2, seed=0)


def test_concat_and_targets(ds):
    both = DetectionSet.concat([ds.subset([0, 1]), ds.subset([2])])
    assert np.array_equal(both.images, ds.images[:3]) and both.num_objects == sum(len(c) for c in ds.classes[:3])
    t = ds.targets()
    assert len(t) == 20 and np.array_equal(t[4].boxes, ds.boxes[4]) and (t[4].scores == 1).all()
    with pytest.raises(DataError, match="cannot concatenate"):
        DetectionSet.concat([ds, generate(2, size=40)])


def test_to_coco_dict(ds):
    d = ds.to_coco_dict()
    assert [c["name"] for c in d["categories"]] == list(ds.labels) and d["categories"][0]["id"] == 1
    assert len(d["images"]) == 20 and d["images"][0] == {"id": 1, "width": 32, "height": 32, "file_name": "000000.png"}
    assert len(d["annotations"]) == ds.num_objects and min(a["id"] for a in d["annotations"]) == 1
    a = d["annotations"][0]
    x1, y1, x2, y2 = ds.boxes[0][0]
    assert a["image_id"] == 1 and a["category_id"] == int(ds.classes[0][0]) + 1
    assert a["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1]) and a["area"] == pytest.approx((x2 - x1) * (y2 - y1))


def test_the_set_checks_itself(ds):
    with pytest.raises(DataError, match="uint8"):
        DetectionSet(ds.images.astype(np.float32), ds.boxes, ds.classes, ds.labels)
    with pytest.raises(DataError, match="20 images but 19 box"):
        DetectionSet(ds.images, ds.boxes[:19], ds.classes, ds.labels)
    bad = list(ds.classes)
    bad[2] = np.full(len(bad[2]), 4)
    with pytest.raises(DataError, match="image 2 has class 4 but 4 labels"):
        DetectionSet(ds.images, ds.boxes, bad, ds.labels)
    with pytest.raises(DataError, match="image 0 has 0 boxes"):
        DetectionSet(ds.images, [np.zeros((0, 4))] + ds.boxes[1:], ds.classes, ds.labels)


def test_sha256_follows_the_content(ds):
    moved = [b.copy() for b in ds.boxes]
    moved[0][0, 0] += 1
    assert DetectionSet(ds.images, moved, ds.classes, ds.labels).sha256 != ds.sha256
    assert DetectionSet(ds.images, ds.boxes, ds.classes, ds.labels).sha256 == ds.sha256
