"""YOLO folders and COCO files: round trips, letterboxing, and one-line errors that name the file and line."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgecore.errors import ConfigError, DataError
from toolchain.detection import formats
from toolchain.detection.data import DetectionSet, Letterbox, load_source
from toolchain.detection.formats import load_coco, load_yolo, write_coco, write_yolo_folder
from toolchain.detection.shapes import generate


@pytest.fixture(scope="module")
def small() -> DetectionSet:
    return generate(6, size=48, seed=2)


def _same_boxes(a: DetectionSet, b: DetectionSet, tol: float = 1e-3) -> bool:
    return all(
        np.array_equal(ca, cb) and (len(ba) == 0 or np.abs(ba - bb).max() <= tol)
        for ba, bb, ca, cb in zip(a.boxes, b.boxes, a.classes, b.classes)
    )


def _error(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------- YOLO


@pytest.mark.parametrize("names", ["data.yaml", "classes.txt"])
def test_yolo_round_trip(small, tmp_path, names):
    root = write_yolo_folder(small, tmp_path / "y", names=names)
    got = load_yolo(root, size=48)
    assert got.labels == small.labels
    assert np.array_equal(got.images, small.images)
    assert _same_boxes(got, small)
    assert got.files[0].endswith("000000.png") and got.letterboxes[0] == Letterbox(1.0, 0, 0, 48, 48)
    assert not _same_boxes(got, generate(6, size=48, seed=3))  # the comparison can fail


def test_yolo_without_names_numbers_the_classes_it_finds(small, tmp_path):
    root = write_yolo_folder(small, tmp_path / "y", names="")
    got = load_yolo(root, size=48)
    top = max(int(c.max()) for c in small.classes)
    assert got.labels == tuple(str(i) for i in range(top + 1))


def test_yolo_nested_splits_polygons_and_yaml_index_maps(tmp_path):
    root = tmp_path / "y"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    Image.new("RGB", (40, 20), (10, 20, 30)).save(root / "images" / "train" / "a.png")
    (root / "labels" / "train" / "a.txt").write_text("1 0.5 0.5 0.5 0.5\n\n0 0.1 0.2 0.3 0.2 0.2 0.8\n")
    (root / "data.yaml").write_text("path: .\nnames:\n  0: cat\n  1: dog\n")
    got = load_yolo(root, size=40)
    assert got.labels == ("cat", "dog")
    lb = got.letterboxes[0]
    assert lb == Letterbox(scale=1.0, pad_x=0, pad_y=10, width=40, height=20)
    np.testing.assert_allclose(lb.to_file(got.boxes[0]), [[10, 5, 30, 15], [4, 4, 12, 16]], atol=1e-4)
    assert got.classes[0].tolist() == [1, 0]
    # the letterbox pads with grey above and below the 40x20 picture
    img = got.images[0]
    assert (img[:, :10] == formats.PAD_VALUE).all() and (img[:, 30:] == formats.PAD_VALUE).all()
    assert (img[:, 10:30] == np.array([10, 20, 30])[:, None, None]).all()


def test_names_by_hand_reads_the_common_yaml_spellings():
    assert formats._names_by_hand("train: x\nnames: ['a', \"b\", c]\n") == ["a", "b", "c"]
    assert formats._names_by_hand("names:\n  - a\n  - b\nnc: 2\n") == ["a", "b"]
    assert formats._names_by_hand("names:\n  0: a\n  1: 'b'\nval: v\n") == {"0": "a", "1": "b"}
    assert formats._names_by_hand("nc: 2\n") is None


def test_letterbox_maps_boxes_to_the_input_and_back():
    lb = Letterbox.fit(200, 100, 64)
    assert (lb.scale, lb.pad_x, lb.pad_y, lb.resized) == (0.32, 0, 16, (64, 32))
    boxes = np.array([[0, 0, 200, 100], [50, 25, 100, 75]], np.float32)
    inp = lb.to_input(boxes)
    np.testing.assert_allclose(inp, [[0, 16, 64, 48], [16, 24, 32, 40]], atol=1e-5)
    np.testing.assert_allclose(lb.to_file(inp), boxes, atol=1e-4)
    np.testing.assert_allclose(lb.to_file([[-5, 0, 70, 64]]), [[0, 0, 200, 100]])  # clipped to the file


def _yolo(tmp_path: Path, lines: list[str], *, names: str | None = "a\nb\nc\n", n_images: int = 2) -> Path:
    root = tmp_path / "y"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n_images):
        Image.new("RGB", (50, 40), (100, 100, 100)).save(root / "images" / f"{i}.png")
        (root / "labels" / f"{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "labels" / "1.txt").write_text("".join(line + "\n" for line in lines))
    if names is not None:
        (root / "classes.txt").write_text(names)
    return root


def test_a_valid_folder_loads_so_the_errors_below_are_the_lines_fault(tmp_path):
    got = load_yolo(_yolo(tmp_path, ["2 0.5 0.5 0.2 0.2", "1 0.998 0.5 0.01 0.2"]), size=32)
    assert got.classes[1].tolist() == [2, 1]
    assert got.letterboxes[1].to_file(got.boxes[1])[1, 2] == pytest.approx(50.0, abs=1e-3)  # overshoot clipped


@pytest.mark.parametrize(
    "line, expect",
    [
        ("3 0.5 0.5 0.2 0.2", r"1\.txt:2: class 3 out of range: 3 classes named in .*classes\.txt"),
        ("0 0.5 0.5 0.2", r"1\.txt:2: malformed line '0 0\.5 0\.5 0\.2'.*got 4 numbers"),
        ("0 0.5 0.5 0.2 0.2 0.3", r"1\.txt:2: malformed line.*got 6 numbers"),
        ("a 0.5 0.5 0.2 0.2", r"1\.txt:2: malformed line 'a 0\.5"),
        ("1.5 0.5 0.5 0.2 0.2", r"1\.txt:2: class '1\.5' is not a non-negative integer"),
        ("-1 0.5 0.5 0.2 0.2", r"1\.txt:2: class '-1'"),
        ("0 0.5 0.5 0 0.2", r"1\.txt:2: box width and height must be positive"),
        ("0 0.95 0.5 0.2 0.2", r"1\.txt:2: box \[42\.5, 16, 52\.5, 24\].*outside the 50x40 image"),
        ("0 0.5 nan 0.2 0.2", r"1\.txt:2: malformed line.*finite"),
    ],
)
def test_yolo_errors_name_the_file_and_line(tmp_path, line, expect):
    msg = _error(load_yolo, _yolo(tmp_path, ["0 0.5 0.5 0.2 0.2", line]), size=32)
    assert re.search(expect, msg), msg


def test_yolo_unreadable_image_and_missing_folders(tmp_path):
    root = _yolo(tmp_path, ["0 0.5 0.5 0.2 0.2"])
    (root / "images" / "1.png").write_bytes(b"not a png")
    assert "1.png" in _error(load_yolo, root, size=32) and "cannot read image" in _error(load_yolo, root, size=32)
    assert "has no images/ folder" in _error(load_yolo, tmp_path / "nowhere", size=32)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    assert "no images under images/" in _error(load_yolo, tmp_path / "empty", size=32)


def test_missing_label_files_are_counted_in_one_warning(tmp_path, caplog):
    root = _yolo(tmp_path, ["0 0.5 0.5 0.2 0.2"], n_images=4)
    for i in (0, 2, 3):
        (root / "labels" / f"{i}.txt").unlink()
    with caplog.at_level(logging.WARNING, logger="toolchain.detection.formats"):
        got = load_yolo(root, size=32)
    assert [len(c) for c in got.classes] == [0, 1, 0, 0]
    records = [r for r in caplog.records if r.name == "toolchain.detection.formats"]
    assert len(records) == 1 and "3 of 4 images have no label file" in records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="toolchain.detection.formats"):
        load_yolo(_yolo(tmp_path / "full", ["0 0.5 0.5 0.2 0.2"]), size=32)
    assert not caplog.records  # no warning when every label file is there


def test_a_bad_data_yaml_is_named(tmp_path):
    root = _yolo(tmp_path, ["0 0.5 0.5 0.2 0.2"], names=None)
    (root / "data.yaml").write_text("names:\n  0: a\n  2: c\n")
    assert "data.yaml" in _error(load_yolo, root, size=32) and "0..1" in _error(load_yolo, root, size=32)


# ---------------------------------------------------------------- COCO


def test_coco_round_trip_and_image_lookup(small, tmp_path):
    jf = write_coco(small, tmp_path / "c")
    got = load_coco(jf, size=48)
    assert got.labels == small.labels and np.array_equal(got.images, small.images) and _same_boxes(got, small)
    # images beside the JSON are found too
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (tmp_path / "c" / "images").iterdir():
        p.rename(flat / p.name)
    (flat / "ann.json").write_text(jf.read_text())
    assert _same_boxes(load_coco(flat / "ann.json", size=48), small)


def _coco(tmp_path: Path, **change) -> Path:
    root = tmp_path / "c"
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (60, 30)).save(root / "images" / "a.png")
    doc = {
        "images": [{"id": 7, "file_name": "a.png", "width": 60, "height": 30}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 5, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 9, "bbox": [0, 0, 60, 30], "iscrowd": 0},
            {"id": 3, "image_id": 7, "category_id": 9, "bbox": [0, 0, 5, 5], "iscrowd": 1},
        ],
        "categories": [{"id": 9, "name": "dog"}, {"id": 3, "name": "cat"}],
    }
    for k, v in change.items():
        doc[k] = v(doc[k]) if callable(v) else v
    (root / "ann.json").write_text(json.dumps(doc))
    return root / "ann.json"


def test_coco_categories_in_id_order_crowds_skipped_and_letterboxed(tmp_path):
    got = load_coco(_coco(tmp_path), size=30)
    assert got.labels == ("cat", "dog")
    assert got.classes[0].tolist() == [0, 1]  # the crowd annotation is left out
    lb = got.letterboxes[0]
    assert (lb.scale, lb.pad_x, lb.pad_y) == (0.5, 0, 7)
    np.testing.assert_allclose(got.boxes[0], [[5, 9.5, 15, 14.5], [0, 7, 30, 22]])
    np.testing.assert_allclose(lb.to_file(got.boxes[0]), [[10, 5, 30, 15], [0, 0, 60, 30]])


def _ann(i: int, **kw):
    def edit(anns):
        anns[i] = {**anns[i], **kw}
        return anns

    return edit


@pytest.mark.parametrize(
    "change, expect",
    [
        ({"annotations": _ann(1, category_id=4)}, r"ann\.json: annotation #1 \(id 2\): category_id 4 is not among"),
        ({"annotations": _ann(0, bbox=[50, 5, 20, 10])}, r"annotation #0 \(id 1\): box \[50, 5, 70, 15\].*outside the 60x30"),
        ({"annotations": _ann(0, bbox=[1, 2, 3])}, r"annotation #0 \(id 1\): bbox must be 4 finite numbers"),
        ({"annotations": _ann(0, bbox=[1, 2, 0, 3])}, r"annotation #0 \(id 1\): bbox width and height must be positive"),
        ({"annotations": _ann(0, image_id=8)}, r"annotation #0 \(id 1\): image_id 8 is not among the images"),
        ({"annotations": _ann(0, bbox=None)}, r"annotation #0 \(id 1\): needs image_id, category_id and bbox"),
        ({"images": [{"id": 7, "file_name": "b.png"}]}, r"image 'b\.png' not found beside the file or in its images/"),
        ({"categories": []}, r"ann\.json' has no categories"),
        ({"images": [{"id": 7}]}, r"lacks its id, name or file_name"),
    ],
)
def test_coco_errors_name_the_file_and_annotation(tmp_path, change, expect):
    load_coco(_coco(tmp_path / "ok"), size=30)  # the baseline loads: the failure is the change's
    msg = _error(load_coco, _coco(tmp_path / "bad", **change), size=30)
    assert re.search(expect, msg), msg


def test_coco_unreadable_json_and_image(tmp_path):
    jf = _coco(tmp_path)
    (jf.parent / "images" / "a.png").write_bytes(b"\x89PNG broken")
    assert "a.png" in _error(load_coco, jf, size=30)
    jf.write_text("{not json")
    assert "is not valid JSON" in _error(load_coco, jf, size=30)
    assert "cannot read COCO file" in _error(load_coco, tmp_path / "missing.json", size=30)


# ---------------------------------------------------------------- sources


def test_load_source_dispatches_and_refuses_unknown_sources(small, tmp_path):
    assert len(load_source("shapes", image_size=32, count=5)) == 5
    write_yolo_folder(small, tmp_path / "y")
    assert load_source(f"yolo:{tmp_path / 'y'}", image_size=48).labels == small.labels
    jf = write_coco(small, tmp_path / "c")
    assert len(load_source(f"coco:{jf}", image_size=48)) == 6
    with pytest.raises(ConfigError, match=r"unknown detection source 'voc:x' \(shapes, yolo:PATH, coco:"):
        load_source("voc:x")
