"""The generated shapes set: deterministic, tight boxes around what was painted, drift that changes the pixels."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edgecore.errors import ConfigError
from toolchain.detection import shapes
from toolchain.detection.shapes import LABELS, generate


def _painted(seed: int, i: int, size=(96, 96)):
    """Image ``i``'s background alone, the painted image and its boxes, by the generator's own steps."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng([seed, i])
    bg = shapes._background(rng, yy, xx)
    img = bg.copy()
    boxes, classes = shapes._objects(rng, img, scale=1.0)
    return bg, img, boxes, classes


def test_generation_is_deterministic_per_seed_and_image():
    a, b = generate(12, seed=5), generate(12, seed=5)
    assert np.array_equal(a.images, b.images)
    assert all(np.array_equal(x, y) for x, y in zip(a.boxes, b.boxes))
    other = generate(12, seed=6)
    assert not np.array_equal(a.images, other.images)
    prefix = generate(4, seed=5)  # image i depends on (seed, i) only
    assert np.array_equal(prefix.images, a.images[:4])
    later = generate(5, seed=5, first=7)  # a camera's later frames: images 7..11, boxes with them
    assert np.array_equal(later.images, a.images[7:])
    assert all(np.array_equal(x, y) for x, y in zip(later.boxes, a.boxes[7:]))
    drifted = generate(5, seed=5, first=7, drift="scale")  # the same scenes, drifted
    assert not np.array_equal(drifted.images, later.images) and len(drifted) == 5
    assert a.sha256 == b.sha256 != other.sha256


def test_images_boxes_and_classes_are_well_formed():
    d = generate(40, seed=0)
    assert d.images.shape == (40, 3, 96, 96) and d.images.dtype == np.uint8
    assert d.labels == LABELS == ("circle", "square", "triangle", "star")
    counts = [len(c) for c in d.classes]
    assert 1 <= min(counts) and max(counts) <= 5 and len(set(counts)) > 2
    allc = np.concatenate(d.classes)
    assert set(allc.tolist()) == {0, 1, 2, 3}
    b = np.concatenate(d.boxes)
    assert b.dtype == np.float32 and (b[:, :2] >= 0).all() and (b[:, 2] <= 96).all() and (b[:, 3] <= 96).all()
    wh = b[:, 2:] - b[:, :2]
    assert wh.min() >= 3 and wh.max() <= 60 and wh.std() > 3  # varied sizes
    assert np.any(np.abs(wh[:, 0] / wh[:, 1] - 1) > 0.25)  # varied aspect
    # some objects overlap
    overlaps = sum(
        1 for bx in d.boxes for i in range(len(bx)) for j in range(i)
        if min(bx[i, 2], bx[j, 2]) > max(bx[i, 0], bx[j, 0]) and min(bx[i, 3], bx[j, 3]) > max(bx[i, 1], bx[j, 1])
    )
    assert overlaps > 0


def test_boxes_are_the_tight_extents_of_what_was_painted():
    bad_shift = 0
    for i in range(25):
        bg, img, boxes, _ = _painted(3, i)
        changed = np.any(img != bg, axis=2)
        inside_any = np.zeros_like(changed)
        for x1, y1, x2, y2 in boxes.astype(int):
            inside_any[y1:y2, x1:x2] = True
            region = changed[y1:y2, x1:x2]
            assert region.mean() > 0.3  # the object fills its box (the star least)
            assert np.abs(img[y1:y2, x1:x2] - bg[y1:y2, x1:x2]).mean() > 10
        assert not (changed & ~inside_any).any(), "painted pixels outside every box"
        # the last object is never covered: its box is exactly the extent of the pixels it changed
        x1, y1, x2, y2 = boxes[-1].astype(int)
        ys, xs = np.nonzero(changed[y1:y2, x1:x2])
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, x2 - x1, y2 - y1)
        # sibling check: a box one pixel too small on the left no longer holds every painted pixel of its object
        shrunk = changed[y1:y2, x1 + 1 : x2]
        bad_shift += int(shrunk.sum() < changed[y1:y2, x1:x2].sum())
    assert bad_shift == 25


def test_the_stored_images_are_the_painted_ones():
    d = generate(3, seed=3)
    for i in range(3):
        _, img, boxes, classes = _painted(3, i)
        assert np.array_equal(d.boxes[i], boxes) and np.array_equal(d.classes[i], classes)
        diff = np.abs(d.images[i].transpose(1, 2, 0).astype(np.float32) - np.clip(img, 0, 255))
        assert float(diff.max()) <= 0.5 + 1e-3


def test_drift_variants_change_the_pixels_the_way_they_say():
    clean = generate(30, seed=1)
    light = generate(30, seed=1, drift="lighting")
    blur = generate(30, seed=1, drift="blur")
    scale = generate(30, seed=1, drift="scale")
    both = generate(30, seed=1, drift="all")
    for d in (light, blur):  # same scenes, same boxes
        assert all(np.array_equal(a, b) for a, b in zip(clean.boxes, d.boxes))
    f = lambda d: d.images.astype(np.float32)  # noqa: E731
    assert np.abs(f(light) - f(clean)).mean() > 20  # lighting moves every pixel
    # colour statistics shift: per-image mean brightness changes by a lot on average
    assert np.abs(f(light).mean(axis=(1, 2, 3)) - f(clean).mean(axis=(1, 2, 3))).mean() > 15

    def sharpness(d):
        x = f(d)
        return np.abs(np.diff(x, axis=3)).mean()

    assert sharpness(blur) < 0.6 * sharpness(clean)
    area = lambda d: np.mean([((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).mean() for b in d.boxes])  # noqa: E731
    assert area(scale) < 0.4 * area(clean)
    assert area(both) < 0.4 * area(clean) and sharpness(both) < 0.6 * sharpness(clean)
    assert sharpness(clean) == pytest.approx(sharpness(generate(30, seed=1)))  # the comparison itself is stable


def test_other_sizes_and_bad_arguments():
    d = generate(3, size=320, seed=0)
    assert d.images.shape == (3, 3, 320, 320)
    wh = np.concatenate(d.boxes)[:, 2:] - np.concatenate(d.boxes)[:, :2]
    assert wh.max() > 60  # objects scale with the image
    assert generate(2, size=(64, 80)).images.shape == (2, 3, 64, 80)
    assert len(generate(0)) == 0
    with pytest.raises(ConfigError, match="unknown drift 'fog'"):
        generate(2, drift="fog")
    with pytest.raises(ConfigError, match="16x16"):
        generate(2, size=8)
    with pytest.raises(ConfigError, match="first=-1"):
        generate(2, first=-1)


def test_generation_is_fast():
    t = time.perf_counter()
    generate(200, seed=0)
    # about a second per thousand 96x96 images on an idle core; generous for a loaded shared CPU
    assert time.perf_counter() - t < 4.0
