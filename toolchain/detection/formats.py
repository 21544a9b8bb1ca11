"""Detection data in the formats users keep it in: a YOLO folder and COCO JSON.

``yolo:PATH``: ``PATH/images/**`` (any depth) and ``PATH/labels/**`` mirroring it, one ``.txt`` per image, one
object per line ``class cx cy w h`` normalised to [0, 1] (a polygon line ``class x1 y1 x2 y2 ...`` counts as its
bounding box). Class names come from ``PATH/data.yaml`` (``names:`` as a list or an index map), else
``PATH/classes.txt`` (one per line), else the indices found. An image without a label file has no objects; all
such images are counted in one warning.

``coco:PATH/annotations.json``: a COCO ``instances`` file; ``file_name`` is looked up beside the JSON, then in
its ``images/`` folder. Categories become class indices in order of their ids; crowd annotations are skipped.

Every image is letterboxed into ``size x size`` (aspect kept, grey padding) and its boxes with it; the set
records each image's `Letterbox` so predictions map back to the file. Problems a user can cause raise one-line
`DataError` naming the file (and the line or annotation): a box outside its image by more than half a percent
of the image's side (smaller overshoots are clipped), a class out of range, a malformed line, an unreadable
image.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgecore.errors import DataError
from toolchain.detection.data import DetectionSet, Letterbox

__all__ = ["load_yolo", "load_coco", "write_yolo_folder", "write_coco", "read_image", "BOX_TOLERANCE"]

log = logging.getLogger(__name__)

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
BOX_TOLERANCE = 0.005  # how far (share of the image's side) a box may overshoot its image before it is an error
PAD_VALUE = 114  # the letterbox's grey (`edgecore.spec.InputSpec.pad_value`'s default: the device fills the same)


# ---------------------------------------------------------------------------- images


def read_image(path: Path, size: int, channels: int = 3) -> tuple[np.ndarray, Letterbox]:
    """The file letterboxed into ``(channels, size, size)`` uint8, and how it was placed."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            lb = Letterbox.fit(im.width, im.height, size)
            im = im.resize(lb.resized, Image.BILINEAR)
            arr = np.asarray(im, np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {str(path)!r}: {e}") from e
    arr = arr[..., None] if arr.ndim == 2 else arr
    out = np.full((size, size, arr.shape[2]), PAD_VALUE, np.uint8)
    out[lb.pad_y : lb.pad_y + arr.shape[0], lb.pad_x : lb.pad_x + arr.shape[1]] = arr
    return out.transpose(2, 0, 1), lb


def _image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file without decoding its pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.width, im.height
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {str(path)!r}: {e}") from e


def _check_boxes(boxes: np.ndarray, width: int, height: int, where: list[str]) -> np.ndarray:
    """Refuse boxes beyond the image (by more than the tolerance) or empty; clip the small overshoots."""
    tol = np.array([width, height, width, height], np.float64) * BOX_TOLERANCE
    lo = boxes[:, :2] < -tol[:2]
    hi = boxes[:, 2:] > np.array([width, height]) + tol[2:]
    bad = np.flatnonzero(lo.any(1) | hi.any(1))
    if len(bad):
        k = int(bad[0])
        raise DataError(
            f"{where[k]}: box {_fmt(boxes[k])} lies outside the {width}x{height} image "
            f"(more than {BOX_TOLERANCE:.1%} of its side)"
        )
    boxes = boxes.copy()
    np.clip(boxes[:, 0::2], 0, width, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0, height, out=boxes[:, 1::2])
    empty = np.flatnonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if len(empty):
        k = int(empty[0])
        raise DataError(f"{where[k]}: box {_fmt(boxes[k])} has no width or no height")
    return boxes


def _fmt(box: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in box) + "] (x1, y1, x2, y2 pixels)"


# ---------------------------------------------------------------------------- YOLO


def load_yolo(path: str | os.PathLike[str], *, size: int, channels: int = 3) -> DetectionSet:
    """A YOLO folder (see the module docstring), letterboxed to ``size``."""
    root = Path(path)
    img_dir, lbl_dir = root / "images", root / "labels"
    if not img_dir.is_dir():
        raise DataError(f"YOLO folder {str(root)!r} has no images/ folder")
    files = sorted(p for p in img_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXT)
    if not files:
        raise DataError(f"YOLO folder {str(root)!r}: no images under images/ ({', '.join(sorted(IMAGE_EXT))})")
    named = _yolo_names(root)  # (names, the file naming them) or None
    images, boxes, classes, letterboxes, missing = [], [], [], [], 0
    for f in files:
        label_file = (lbl_dir / f.relative_to(img_dir)).with_suffix(".txt")
        img, lb = read_image(f, size, channels)
        if label_file.is_file():
            cls, norm, where = _read_yolo_labels(label_file)
        else:
            missing += 1
            cls, norm, where = np.zeros(0, np.int64), np.zeros((0, 4)), []
        if named is not None and len(cls) and cls.max() >= len(named[0]):
            k = int(np.argmax(cls >= len(named[0])))
            raise DataError(
                f"{where[k]}: class {int(cls[k])} out of range: {len(named[0])} classes named in {named[1]} "
                f"(indices 0..{len(named[0]) - 1})"
            )
        px = norm * np.array([lb.width, lb.height, lb.width, lb.height], np.float64)
        px = _check_boxes(px, lb.width, lb.height, where)
        images.append(img)
        boxes.append(lb.to_input(px))
        classes.append(cls)
        letterboxes.append(lb)
    if missing:
        log.warning("YOLO folder %s: %d of %d images have no label file (taken as images without objects)",
                    root, missing, len(files))
    if named is None:
        top = max((int(c.max()) for c in classes if len(c)), default=-1)
        labels: tuple[str, ...] = tuple(str(i) for i in range(max(top + 1, 1)))
    else:
        labels = named[0]
    return DetectionSet(
        images=np.stack(images), boxes=boxes, classes=classes, labels=labels,
        files=tuple(str(f) for f in files), letterboxes=tuple(letterboxes),
    )


def _read_yolo_labels(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Classes (K,), normalised ``xyxy`` boxes (K, 4) and ``file:line`` of each object."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read label file {str(path)!r}: {e}") from e
    cls: list[int] = []
    rows: list[list[float]] = []
    where: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        at = f"{path}:{n}"
        try:
            vals = [float(v) for v in parts]
        except ValueError:
            raise DataError(f"{at}: malformed line {line.strip()!r}: expected numbers 'class cx cy w h'") from None
        if len(vals) < 5 or (len(vals) > 5 and len(vals) % 2 == 0):
            raise DataError(
                f"{at}: malformed line {line.strip()!r}: expected 'class cx cy w h' (5 numbers) or a polygon "
                f"'class x1 y1 x2 y2 ...', got {len(vals)} numbers"
            )
        c = vals[0]
        if not math.isfinite(c) or c != int(c) or c < 0:
            raise DataError(f"{at}: class {parts[0]!r} is not a non-negative integer")
        if not all(math.isfinite(v) for v in vals[1:]):
            raise DataError(f"{at}: malformed line {line.strip()!r}: coordinates must be finite")
        if len(vals) == 5:
            cx, cy, w, h = vals[1:]
            if w <= 0 or h <= 0:
                raise DataError(f"{at}: box width and height must be positive, got w={parts[3]} h={parts[4]}")
            rows.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        else:  # a polygon (segmentation line): its bounding box
            xs, ys = vals[1::2], vals[2::2]
            rows.append([min(xs), min(ys), max(xs), max(ys)])
        cls.append(int(c))
        where.append(at)
    return np.asarray(cls, np.int64), np.asarray(rows, np.float64).reshape(-1, 4), where


def _yolo_names(root: Path) -> tuple[tuple[str, ...], str] | None:
    """Class names and the file that named them (``data.yaml``, else ``classes.txt``), or None."""
    yaml_file = next((root / n for n in ("data.yaml", "data.yml", "dataset.yaml") if (root / n).is_file()), None)
    if yaml_file is not None:
        names = _names_from_yaml(yaml_file)
        if names is not None:
            return names, str(yaml_file)
    txt = root / "classes.txt"
    if txt.is_file():
        try:
            names = tuple(line.strip() for line in txt.read_text().splitlines() if line.strip())
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {str(txt)!r}: {e}") from e
        if not names:
            raise DataError(f"{str(txt)!r} names no classes")
        return names, str(txt)
    return None


def _names_from_yaml(path: Path) -> tuple[str, ...] | None:
    """The ``names`` of an Ultralytics ``data.yaml``: a list, or a map from index to name (None if absent)."""
    try:
        import yaml
    except ImportError:  # PyYAML is not a dependency: read the two common spellings by hand
        yaml = None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {str(path)!r}: {e}") from e
    if yaml is not None:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise DataError(f"{str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from e
        names = doc.get("names") if isinstance(doc, dict) else None
    else:
        names = _names_by_hand(text)
    if names is None:
        return None
    if isinstance(names, dict):
        try:
            idx = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DataError(f"{str(path)!r}: names must map class indices to names") from None
        if idx != list(range(len(idx))):
            raise DataError(f"{str(path)!r}: names must map the indices 0..{len(idx) - 1}, got {idx}")
        by_int = {int(k): v for k, v in names.items()}
        return tuple(str(by_int[i]) for i in idx)
    if isinstance(names, list) and names:
        return tuple(str(v) for v in names)
    raise DataError(f"{str(path)!r}: names must be a non-empty list or an index map")


def _names_by_hand(text: str) -> list[str] | dict[str, str] | None:
    """``names: [a, b]``, or ``names:`` followed by ``- a`` lines or ``0: a`` lines."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("names:"):
            continue
        rest = line[len("names:"):].strip()
        if rest.startswith("["):
            return [v.strip().strip("'\"") for v in rest.strip("[]").split(",") if v.strip()]
        out_list: list[str] = []
        out_map: dict[str, str] = {}
        for sub in lines[i + 1 :]:
            s = sub.strip()
            if not s or s.startswith("#"):
                continue
            if not sub[:1].isspace() and not s.startswith("-"):
                break
            if s.startswith("-"):
                out_list.append(s[1:].strip().strip("'\""))
            elif ":" in s:
                k, v = s.split(":", 1)
                out_map[k.strip()] = v.strip().strip("'\"")
        return out_map or out_list or None
    return None


# ---------------------------------------------------------------------------- COCO


def load_coco(path: str | os.PathLike[str], *, size: int, channels: int = 3) -> DetectionSet:
    """A COCO ``instances`` JSON file (see the module docstring), letterboxed to ``size``."""
    jf = Path(path)
    try:
        doc = json.loads(jf.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read COCO file {str(jf)!r}: {e}") from e
    except json.JSONDecodeError as e:
        raise DataError(f"COCO file {str(jf)!r} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations", "categories")):
        raise DataError(f"COCO file {str(jf)!r} needs lists 'images', 'annotations' and 'categories'")
    try:
        cats = sorted((int(c["id"]), str(c["name"])) for c in doc["categories"])
        img_entries = [(int(im["id"]), str(im["file_name"])) for im in doc["images"]]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"COCO file {str(jf)!r}: a category or image entry lacks its id, name or file_name ({e})") from e
    if not cats:
        raise DataError(f"COCO file {str(jf)!r} has no categories")
    cat_index = {cid: k for k, (cid, _) in enumerate(cats)}
    if len(cat_index) != len(cats):
        raise DataError(f"COCO file {str(jf)!r}: category ids repeat")
    if not img_entries:
        raise DataError(f"COCO file {str(jf)!r} has no images")
    per_image: dict[int, list[tuple[int, list[float], str]]] = {i: [] for i, _ in img_entries}
    for n, ann in enumerate(doc["annotations"]):
        at = f"{jf}: annotation #{n} (id {ann.get('id')!r})" if isinstance(ann, dict) else f"{jf}: annotation #{n}"
        if not isinstance(ann, dict):
            raise DataError(f"{at}: expected an object")
        if ann.get("iscrowd", 0):
            continue
        try:
            img_id, cat_id = int(ann["image_id"]), int(ann["category_id"])
            bbox = [float(v) for v in ann["bbox"]]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{at}: needs image_id, category_id and bbox [x, y, w, h] ({e})") from e
        if len(bbox) != 4 or not all(math.isfinite(v) for v in bbox):
            raise DataError(f"{at}: bbox must be 4 finite numbers [x, y, w, h], got {ann['bbox']!r}")
        if cat_id not in cat_index:
            raise DataError(f"{at}: category_id {cat_id} is not among the categories {sorted(cat_index)}")
        if img_id not in per_image:
            raise DataError(f"{at}: image_id {img_id} is not among the images")
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            raise DataError(f"{at}: bbox width and height must be positive, got {ann['bbox']!r}")
        per_image[img_id].append((cat_index[cat_id], [x, y, x + w, y + h], at))
    images, boxes, classes, letterboxes, files = [], [], [], [], []
    for img_id, name in img_entries:
        f = _coco_image(jf, name)
        img, lb = read_image(f, size, channels)
        objs = per_image[img_id]
        px = np.asarray([o[1] for o in objs], np.float64).reshape(-1, 4)
        px = _check_boxes(px, lb.width, lb.height, [o[2] for o in objs])
        images.append(img)
        boxes.append(lb.to_input(px))
        classes.append(np.asarray([o[0] for o in objs], np.int64))
        letterboxes.append(lb)
        files.append(str(f))
    return DetectionSet(
        images=np.stack(images), boxes=boxes, classes=classes, labels=tuple(n for _, n in cats),
        files=tuple(files), letterboxes=tuple(letterboxes),
    )


def _coco_image(json_file: Path, name: str) -> Path:
    for cand in (json_file.parent / name, json_file.parent / "images" / name):
        if cand.is_file():
            return cand
    raise DataError(
        f"{json_file}: image {name!r} not found beside the file or in its images/ folder "
        f"({json_file.parent / name}, {json_file.parent / 'images' / name})"
    )


# ---------------------------------------------------------------------------- writers


def _write_png(img_chw: np.ndarray, path: Path) -> None:
    from PIL import Image

    arr = img_chw.transpose(1, 2, 0)
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(path)


def write_yolo_folder(dataset: DetectionSet, path: str | os.PathLike[str], *, names: str = "data.yaml") -> Path:
    """Write ``dataset`` as a YOLO folder (PNG images, one label file per image, even when empty).

    ``names``: ``"data.yaml"`` (``names:`` as a list), ``"classes.txt"`` or ``""`` (no names file).
    """
    root = Path(path)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    h, w = dataset.image_size
    scale = np.array([w, h, w, h], np.float64)
    for i, (img, b, c) in enumerate(dataset):
        stem = f"{i:06d}"
        _write_png(img, root / "images" / f"{stem}.png")
        nb = b.astype(np.float64) / scale
        lines = [
            f"{int(k)} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}"
            for k, (x1, y1, x2, y2) in zip(c, nb)
        ]
        (root / "labels" / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))
    if names == "data.yaml":
        (root / "data.yaml").write_text("path: .\ntrain: images\nnames: " + json.dumps(list(dataset.labels)) + "\n")
    elif names == "classes.txt":
        (root / "classes.txt").write_text("".join(n + "\n" for n in dataset.labels))
    elif names:
        raise ValueError(f"names must be 'data.yaml', 'classes.txt' or '', got {names!r}")
    return root


def write_coco(dataset: DetectionSet, path: str | os.PathLike[str]) -> Path:
    """Write ``dataset`` as ``path/annotations.json`` plus ``path/images/*.png``; returns the JSON's path."""
    root = Path(path)
    (root / "images").mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = dataset.to_coco_dict()
    for i, entry in enumerate(doc["images"]):
        entry["file_name"] = f"{i:06d}.png"
        _write_png(dataset.images[i], root / "images" / entry["file_name"])
    jf = root / "annotations.json"
    jf.write_text(json.dumps(doc))
    return jf
