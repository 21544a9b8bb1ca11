"""A detection data set in memory: images, boxes per image, class names; and where one comes from.

``data.source`` for detection: ``shapes`` (generated, `toolchain.detection.shapes`), ``yolo:PATH`` (a YOLO
folder) and ``coco:PATH/annotations.json`` (`toolchain.detection.formats`). Boxes are ``xyxy`` float32 in the
pixels of the stored (resized, letterboxed) image; `Letterbox` maps them back to the file's pixels.

Numpy only (Pillow inside the file loaders).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from edgecore.detect import Detections
from edgecore.errors import ConfigError, DataError

__all__ = ["DetectionSet", "Letterbox", "load_source", "SOURCES"]

SOURCES = "shapes, yolo:PATH, coco:PATH/annotations.json"


@dataclass(frozen=True)
class Letterbox:
    """How an image file became a ``size x size`` input: scaled by ``scale`` (aspect kept), then padded by
    ``pad_x`` / ``pad_y`` pixels on the left / top. ``width`` and ``height`` are the file's."""

    scale: float
    pad_x: int
    pad_y: int
    width: int
    height: int

    @classmethod
    def fit(cls, width: int, height: int, size: int) -> "Letterbox":
        """The letterbox that fits a ``width x height`` image into ``size x size``, centred."""
        scale = min(size / width, size / height)
        nw, nh = max(1, round(width * scale)), max(1, round(height * scale))
        return cls(scale=scale, pad_x=(size - nw) // 2, pad_y=(size - nh) // 2, width=width, height=height)

    @property
    def resized(self) -> tuple[int, int]:
        """``(width, height)`` of the scaled image inside the square."""
        return max(1, round(self.width * self.scale)), max(1, round(self.height * self.scale))

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        """``xyxy`` boxes in the file's pixels -> in the input's pixels."""
        b = np.asarray(boxes, np.float32).reshape(-1, 4)
        off = np.array([self.pad_x, self.pad_y, self.pad_x, self.pad_y], np.float32)
        return b * np.float32(self.scale) + off

    def to_file(self, boxes: np.ndarray) -> np.ndarray:
        """``xyxy`` boxes in the input's pixels (predictions) -> in the file's pixels, clipped to the file."""
        b = np.asarray(boxes, np.float32).reshape(-1, 4)
        off = np.array([self.pad_x, self.pad_y, self.pad_x, self.pad_y], np.float32)
        out = (b - off) / np.float32(self.scale)
        np.clip(out[:, 0::2], 0, self.width, out=out[:, 0::2])
        np.clip(out[:, 1::2], 0, self.height, out=out[:, 1::2])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "pad_x": self.pad_x, "pad_y": self.pad_y, "width": self.width, "height": self.height}


@dataclass(frozen=True, eq=False)
class DetectionSet:
    """Images with their objects.

    ``images``: (N, C, H, W) uint8. ``boxes[i]``: (K_i, 4) float32 ``xyxy`` in pixels of ``images[i]``.
    ``classes[i]``: (K_i,) int64 indices into ``labels``. ``files`` and ``letterboxes`` (empty for generated
    sets) say where each image came from and how its file's pixels map to the image's.
    """

    images: np.ndarray
    boxes: list[np.ndarray]
    classes: list[np.ndarray]
    labels: tuple[str, ...]
    files: tuple[str, ...] = ()
    letterboxes: tuple[Letterbox, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(f"detection images must be (N, C, H, W) uint8, got {self.images.shape} {self.images.dtype}")
        if len(self.boxes) != n or len(self.classes) != n:
            raise DataError(f"detection set: {n} images but {len(self.boxes)} box and {len(self.classes)} class arrays")
        for name, seq in (("files", self.files), ("letterboxes", self.letterboxes)):
            if seq and len(seq) != n:
                raise DataError(f"detection set: {n} images but {len(seq)} {name}")
        object.__setattr__(self, "boxes", [np.asarray(b, np.float32).reshape(-1, 4) for b in self.boxes])
        object.__setattr__(self, "classes", [np.asarray(c, np.int64).reshape(-1) for c in self.classes])
        object.__setattr__(self, "labels", tuple(str(v) for v in self.labels))
        for i, (b, c) in enumerate(zip(self.boxes, self.classes)):
            if len(b) != len(c):
                raise DataError(f"detection set: image {i} has {len(b)} boxes and {len(c)} classes")
            if len(c) and (c.min() < 0 or c.max() >= len(self.labels)):
                raise DataError(f"detection set: image {i} has class {int(c.max())} but {len(self.labels)} labels")

    # ------------------------------------------------------------------ shape

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of every image."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def num_objects(self) -> int:
        return int(sum(len(c) for c in self.classes))

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image, boxes, classes)`` of image ``i``."""
        return self.images[i], self.boxes[i], self.classes[i]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return (self[i] for i in range(len(self)))

    # ------------------------------------------------------------------ subsets

    def subset(self, index: Sequence[int] | np.ndarray | slice) -> "DetectionSet":
        """The images at ``index`` (integers, a boolean mask or a slice), in that order."""
        idx = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        return DetectionSet(
            images=self.images[idx],
            boxes=[self.boxes[i] for i in idx],
            classes=[self.classes[i] for i in idx],
            labels=self.labels,
            files=tuple(self.files[i] for i in idx) if self.files else (),
            letterboxes=tuple(self.letterboxes[i] for i in idx) if self.letterboxes else (),
        )

    def split(self, val_fraction: float, test_fraction: float, *, seed: int) -> tuple["DetectionSet", "DetectionSet", "DetectionSet"]:
        """``(train, val, test)``: a seeded shuffle cut by the fractions (at least one image in each part)."""
        n = len(self)
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ConfigError(f"data: val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1) and sum below 1")
        if n < 3:
            raise DataError(f"detection set has {n} image(s); need at least 3 to split into train/val/test")
        perm = np.random.default_rng(seed).permutation(n)
        n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
        n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
        if n_test + n_val >= n:
            raise DataError(f"detection set has {n} images: too few for val {val_fraction} and test {test_fraction}")
        test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
        return self.subset(np.sort(train)), self.subset(np.sort(val)), self.subset(np.sort(test))

    @staticmethod
    def concat(parts: Sequence["DetectionSet"]) -> "DetectionSet":
        """One set of every part's images, in order (same labels and image size)."""
        if not parts:
            raise DataError("cannot concatenate zero detection sets")
        first = parts[0]
        for p in parts[1:]:
            if p.labels != first.labels or p.images.shape[1:] != first.images.shape[1:]:
                raise DataError(
                    f"cannot concatenate detection sets with labels {list(p.labels)} / images {p.images.shape[1:]} "
                    f"and labels {list(first.labels)} / images {first.images.shape[1:]}"
                )
        with_meta = all(p.files for p in parts) and all(p.letterboxes for p in parts)
        return DetectionSet(
            images=np.concatenate([p.images for p in parts]),
            boxes=[b for p in parts for b in p.boxes],
            classes=[c for p in parts for c in p.classes],
            labels=first.labels,
            files=tuple(f for p in parts for f in p.files) if with_meta else (),
            letterboxes=tuple(lb for p in parts for lb in p.letterboxes) if with_meta else (),
        )

    # ------------------------------------------------------------------ views

    def targets(self) -> list[Detections]:
        """The ground truth as `Detections` (score 1), one per image: what metrics compare predictions with."""
        return [Detections(b, np.ones(len(b), np.float32), c) for b, c in zip(self.boxes, self.classes)]

    @functools.cached_property
    def sha256(self) -> str:
        """Digest of images, boxes, classes and labels (computed once)."""
        h = hashlib.sha256()
        h.update(str(self.images.shape).encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        for b, c in zip(self.boxes, self.classes):
            h.update(np.int64(len(c)).tobytes() + np.ascontiguousarray(b).tobytes() + np.ascontiguousarray(c).tobytes())
        h.update("\x00".join(self.labels).encode())
        return h.hexdigest()

    def to_coco_dict(self) -> dict[str, Any]:
        """The ground truth as a COCO ``instances`` dict (what pycocotools reads).

        Image ``i`` has id ``i + 1``; class ``k`` is category id ``k + 1``; boxes are ``[x, y, w, h]`` in the
        stored image's pixels; annotation ids count from 1 (COCOeval treats id 0 as "unmatched").
        """
        h, w = self.image_size
        images = [
            {"id": i + 1, "width": w, "height": h, "file_name": self.files[i] if self.files else f"{i:06d}.png"}
            for i in range(len(self))
        ]
        anns: list[dict[str, Any]] = []
        for i, (b, c) in enumerate(zip(self.boxes, self.classes)):
            wh = b[:, 2:] - b[:, :2]
            for k in range(len(c)):
                x, y, bw, bh = (float(v) for v in (b[k, 0], b[k, 1], wh[k, 0], wh[k, 1]))
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c[k]) + 1,
                             "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        cats = [{"id": k + 1, "name": name} for k, name in enumerate(self.labels)]
        return {"images": images, "annotations": anns, "categories": cats}


def load_source(source: str, *, image_size: int = 96, seed: int = 0, count: int = 1000, channels: int = 3) -> DetectionSet:
    """The detection set ``source`` names (``data.source``).

    ``shapes``: ``count`` generated images of ``image_size`` square from ``seed``; ``yolo:PATH`` and
    ``coco:PATH/annotations.json``: the files, letterboxed to ``image_size`` with ``channels`` (1 or 3; the
    generated set has 3). Unknown sources raise `ConfigError`.
    """
    if source == "shapes":
        from toolchain.detection.shapes import generate

        return generate(count, size=(image_size, image_size), seed=seed)
    if source.startswith("yolo:"):
        from toolchain.detection.formats import load_yolo

        return load_yolo(source.split(":", 1)[1], size=image_size, channels=channels)
    if source.startswith("coco:"):
        from toolchain.detection.formats import load_coco

        return load_coco(source.split(":", 1)[1], size=image_size, channels=channels)
    raise ConfigError(f"data.source: unknown detection source {source!r} ({SOURCES})")
