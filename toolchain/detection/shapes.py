"""The built-in generated detection set (``data.source = "shapes"``): coloured shapes on textured backgrounds.

Each image holds one to five objects of four classes (circle, square, triangle, star) of varied size, colour,
aspect and rotation on a background of noise, a gradient or stripes; later objects may partly cover earlier
ones. Image ``i`` depends only on ``(seed, i)``, so ``generate(n)`` begins with ``generate(k)`` for ``k < n``.

``drift`` makes the variant the closed loop is tested with, from the same scenes (same seed, same objects):

* ``"lighting"``: a colour cast, a gain and a gamma change (boxes unchanged);
* ``"blur"``: a Gaussian-like blur of 1 to 2 pixels (boxes unchanged);
* ``"scale"``: objects at about half the size (different boxes);
* ``"all"``: the three together.

Numpy only: every shape is rasterised as a vectorised mask over its own window.
"""

from __future__ import annotations

import math

import numpy as np

from edgecore.errors import ConfigError
from toolchain.detection.data import DetectionSet

__all__ = ["LABELS", "DRIFTS", "generate"]

LABELS = ("circle", "square", "triangle", "star")
DRIFTS = (None, "lighting", "blur", "scale", "all")
_MAX_OBJECTS = 5


def generate(
    n: int, *, size: tuple[int, int] | int = (96, 96), seed: int = 0, drift: str | None = None, first: int = 0
) -> DetectionSet:
    """``n`` images of ``size`` ``(H, W)`` (3 channels) with their objects: images ``first .. first + n - 1``
    (``first = count`` gives scenes a set of ``count`` images never held: a camera's later frames).

    Every box is the tight box of its shape's rasterised pixels *before occlusion*: an object partly covered by
    a later one keeps its whole box (no object is covered over more than half of its box by a later one).
    """
    if isinstance(size, int):
        size = (size, size)
    h, w = (int(v) for v in size)
    if drift not in DRIFTS:
        raise ConfigError(f"shapes: unknown drift {drift!r} (one of {', '.join(map(str, DRIFTS))})")
    if n < 0 or first < 0 or min(h, w) < 16:
        raise ConfigError(f"shapes: need n >= 0, first >= 0 and images of at least 16x16 pixels, got n={n}, "
                          f"first={first}, size={h}x{w}")
    drifts = {"lighting", "blur", "scale"} if drift == "all" else {drift} - {None}
    images = np.empty((n, 3, h, w), np.uint8)
    boxes, classes = [], []
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for k, i in enumerate(range(first, first + n)):
        rng = np.random.default_rng([seed, i])
        img = _background(rng, yy, xx)
        b, c = _objects(rng, img, scale=0.5 if "scale" in drifts else 1.0)
        if drifts & {"lighting", "blur"}:
            drng = np.random.default_rng([seed, i, 1])
            if "lighting" in drifts:
                img = _lighting(drng, img)
            if "blur" in drifts:
                img = _blur(img, radius=int(drng.integers(1, 3)))
        images[k] = np.clip(img + 0.5, 0, 255).astype(np.uint8).transpose(2, 0, 1)
        boxes.append(b)
        classes.append(c)
    return DetectionSet(images=images, boxes=boxes, classes=classes, labels=LABELS)


# ---------------------------------------------------------------------------- backgrounds


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 in 0..255: noise over coarse blobs, a two-colour gradient or stripes."""
    h, w = yy.shape
    base = rng.uniform(60, 190, 3).astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:  # coarse blobs (upsampled low-resolution noise) plus fine noise
        gh, gw = -(-h // 12), -(-w // 12)
        coarse = rng.standard_normal((gh, gw, 3), dtype=np.float32) * np.float32(22)
        img = base + coarse.repeat(12, 0).repeat(12, 1)[:h, :w]
    elif kind == 1:  # a linear gradient between two colours in a random direction
        other = rng.uniform(40, 210, 3).astype(np.float32)
        a = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(a) + yy * math.sin(a)) / (abs(math.cos(a)) * w + abs(math.sin(a)) * h)
        t = (t - t.min())[..., None]
        img = base + (other - base) * t
    else:  # stripes of a random angle and period
        a, period = rng.uniform(0, math.pi), rng.uniform(5, 16) * max(h, w) / 96
        s = np.sin((xx * math.cos(a) + yy * math.sin(a)) * (2 * math.pi / period))[..., None]
        img = base + s * rng.uniform(12, 30, 3).astype(np.float32)
    img = img + rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(6)
    return img.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------- objects


def _objects(rng: np.random.Generator, img: np.ndarray, *, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Paint 1..5 objects onto ``img`` in place; their tight boxes (K, 4) and classes (K,)."""
    h, w = img.shape[:2]
    side = min(h, w)
    mean = img.reshape(-1, 3).mean(0)  # of the background: what colours must stand out from
    boxes: list[np.ndarray] = []
    classes: list[int] = []
    for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
        cls = int(rng.integers(len(LABELS)))
        r = rng.uniform(0.07, 0.2) * side * scale  # the shape's radius (half its longer side)
        aspect = rng.uniform(0.6, 1.0)  # the shorter side over the longer one
        angle = rng.uniform(0, 2 * math.pi)
        colour = _contrasting(rng, mean)
        for _attempt in range(8):  # a place where no earlier object is covered over more than half its box
            cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
            x0, y0, x1, y1 = int(cx - r - 1), int(cy - r - 1), int(math.ceil(cx + r + 1)), int(math.ceil(cy + r + 1))
            x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
            ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            mask = _mask(cls, xs + 0.5 - cx, ys + 0.5 - cy, r, aspect, angle)
            if not mask.any():
                continue
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            box = np.array([x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1], np.float32)
            if all(_covered(prev, box) <= 0.5 for prev in boxes):
                break
        else:
            continue
        # a little shading so that objects are not flat: brighter towards one side
        shade = 1.0 + 0.15 * ((xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)) / max(r, 1.0)
        region = img[y0:y1, x0:x1]
        region[mask] = (colour[None, :] * shade[mask][:, None]).clip(0, 255)
        boxes.append(box)
        classes.append(cls)
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64)


def _covered(prev: np.ndarray, new: np.ndarray) -> float:
    """Share of ``prev``'s box that ``new`` covers."""
    iw = max(0.0, min(prev[2], new[2]) - max(prev[0], new[0]))
    ih = max(0.0, min(prev[3], new[3]) - max(prev[1], new[1]))
    return iw * ih / max((prev[2] - prev[0]) * (prev[3] - prev[1]), 1e-6)


def _contrasting(rng: np.random.Generator, mean: np.ndarray) -> np.ndarray:
    """A saturated colour far from the background's ``mean``: the farthest of eight candidates."""
    cands = rng.uniform(0, 255, (8, 3)).astype(np.float32)
    cands[np.arange(8), rng.integers(0, 3, 8)] = rng.choice([15.0, 240.0], 8)  # one channel at an extreme
    return cands[np.argmax(np.abs(cands - mean).sum(1))]


def _mask(cls: int, dx: np.ndarray, dy: np.ndarray, r: float, aspect: float, angle: float) -> np.ndarray:
    """Pixels (offsets ``dx``, ``dy`` from the centre) inside the shape of class ``cls``."""
    c, s = math.cos(angle), math.sin(angle)
    u, v = dx * c + dy * s, -dx * s + dy * c  # the shape's own axes
    if cls == 0:  # circle: an ellipse (any rotation)
        return (u / r) ** 2 + (v / (r * aspect)) ** 2 <= 1.0
    if cls == 1:  # square: a rectangle, turned by at most 30 degrees so that it stays square-like
        t = (angle % (math.pi / 2)) - math.pi / 4
        t = t * (math.pi / 6) / (math.pi / 4)
        c2, s2 = math.cos(t), math.sin(t)
        u, v = dx * c2 + dy * s2, -dx * s2 + dy * c2
        half = r / math.sqrt(2)
        return (np.abs(u) <= half) & (np.abs(v) <= half * aspect)
    if cls == 2:  # triangle: equilateral, squashed along one axis
        verts = [(r * math.cos(a), r * aspect * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        return _polygon(u, v, verts)
    outer, inner = r, r * 0.45  # star: five points
    verts = []
    for k in range(10):
        rad, a = (outer if k % 2 == 0 else inner), -math.pi / 2 + k * math.pi / 5
        verts.append((rad * math.cos(a), rad * aspect * math.sin(a)))
    return _polygon(u, v, verts)


def _polygon(x: np.ndarray, y: np.ndarray, verts: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon over every pixel at once (one vectorised pass per edge)."""
    inside = np.zeros(x.shape, bool)
    for (x1, y1), (x2, y2) in zip(verts, verts[1:] + verts[:1]):
        if y1 == y2:
            continue
        crosses = (y1 > y) != (y2 > y)
        xi = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < xi)
    return inside


# ---------------------------------------------------------------------------- drift


def _lighting(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """A colour cast, a gain (darker or brighter) and a gamma change."""
    gain = rng.choice([rng.uniform(0.45, 0.7), rng.uniform(1.3, 1.6)])
    cast = rng.uniform(0.8, 1.2, 3).astype(np.float32)
    gamma = rng.uniform(0.7, 1.4)
    x = np.clip(img * (gain * cast), 0, 255) / 255.0
    return (x ** gamma * 255.0).astype(np.float32)


def _blur(img: np.ndarray, *, radius: int) -> np.ndarray:
    """Three box blurs of ``radius`` in a row along each axis (close to a Gaussian), edges repeated."""
    out = img
    for axis in (0, 1):
        for _ in range(3):
            pad = [(0, 0)] * 3
            pad[axis] = (radius + 1, radius)
            c = np.cumsum(np.pad(out, pad, mode="edge"), axis=axis, dtype=np.float32)
            k = 2 * radius + 1
            hi = np.take(c, np.arange(k, c.shape[axis]), axis=axis)
            lo = np.take(c, np.arange(0, c.shape[axis] - k), axis=axis)
            out = (hi - lo) / k
    return out
