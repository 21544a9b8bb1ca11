"""Data sources: digits split, image folders, user factories; clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgecore.errors import ConfigError, DataError
from toolchain.config import DataConfig
from toolchain.data import data_record, load_splits, splits_from_record


def test_digits_split_is_deterministic_stratified_and_normalised_on_train():
    cfg = DataConfig()
    a = load_splits(cfg, seed=0)
    b = load_splits(cfg, seed=0)
    c = load_splits(cfg, seed=1)
    assert np.array_equal(a.test[0], b.test[0]) and not np.array_equal(a.test[0], c.test[0])
    n = {k: len(getattr(a, k)[1]) for k in ("train", "val", "test", "calibration")}
    assert sum(n.values()) == 1797 and n["test"] == 360 and n["calibration"] == 180
    # stratified: every class in every split, in proportion
    for _, y in (a.train, a.val, a.test, a.calibration):
        frac = np.bincount(y, minlength=10) / len(y)
        assert frac.min() > 0.07 and frac.max() < 0.13
    spec = a.input_spec
    xtr = a.train[0] * spec.scale
    assert spec.mean[0] == pytest.approx(float(xtr.mean()), rel=1e-5)
    assert spec.std[0] == pytest.approx(float(xtr.std()), rel=1e-4)
    # reload from the record gives the same arrays
    r = splits_from_record(data_record(a, cfg, seed=0))
    assert np.array_equal(r.val[0], a.val[0]) and np.array_equal(r.val[1], a.val[1])
    assert np.array_equal(r.calibration[0], a.calibration[0])


def test_the_calibration_split_is_carved_from_training_only():
    """Val and test stay what they were without it; the four splits are disjoint; a run recorded before the
    calibration split existed reloads exactly as it was made (no calibration split)."""
    with_cal = load_splits(DataConfig(), seed=3)
    without = load_splits(DataConfig(calibration_fraction=0.0), seed=3)
    assert len(without.calibration[1]) == 0
    for k in ("val", "test"):
        assert np.array_equal(getattr(with_cal, k)[0], getattr(without, k)[0])
    rows = {x.tobytes() for split in (with_cal.train, with_cal.val, with_cal.test, with_cal.calibration)
            for x in split[0]}
    # digits has duplicate images; disjoint by position: the four splits together are the whole set
    assert sum(len(s[1]) for s in (with_cal.train, with_cal.val, with_cal.test, with_cal.calibration)) == 1797
    assert len(rows) == len({x.tobytes() for s in (without.train, without.val, without.test) for x in s[0]})
    old = data_record(without, DataConfig(calibration_fraction=0.0), seed=3)
    del old["calibration_fraction"]
    r = splits_from_record(old)
    assert len(r.calibration[1]) == 0 and np.array_equal(r.train[0], without.train[0])


@pytest.mark.parametrize(("key", "value", "msg"), [
    ("calibration_fraction", -0.1, "must be in [0, 0.5)"),
    ("calibration_fraction", 0.45, "must leave at least 20% for training"),
])
def test_calibration_fraction_is_bounded(key, value, msg):
    from toolchain.config import from_dict

    with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        from_dict({"data": {key: value}}, origin="t.toml")


def test_record_refuses_changed_data():
    cfg = DataConfig()
    rec = data_record(load_splits(cfg, seed=0), cfg, seed=0)
    rec["sha256"] = "0" * 64
    with pytest.raises(DataError, match="changed since the run was made"):
        splits_from_record(rec)


def _folder(root, classes=("cat", "dog"), n=6, size=10):
    rng = np.random.default_rng(0)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(n):
            arr = (rng.random((size, size, 3)) * 80 + ci * 150).astype(np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def test_imagefolder(tmp_path):
    root = _folder(tmp_path / "imgs")
    s = load_splits(DataConfig(source=f"imagefolder:{root}", image_size=16, channels=3,
                               val_fraction=0.2, test_fraction=0.25), seed=0)
    assert s.labels == ("cat", "dog")
    assert s.train[0].shape[1:] == (3, 16, 16) and s.input_spec.layout == "NCHW"
    assert s.input_spec.scale == pytest.approx(1 / 255) and len(s.input_spec.mean) == 3
    g = load_splits(DataConfig(source=f"imagefolder:{root}", image_size=8, channels=1,
                               val_fraction=0.2, test_fraction=0.25), seed=0)
    assert g.train[0].shape[1:] == (1, 8, 8)


def test_imagefolder_errors(tmp_path):
    one = _folder(tmp_path / "one", classes=("only",))
    with pytest.raises(DataError, match="1 class sub-folder"):
        load_splits(DataConfig(source=f"imagefolder:{one}"), seed=0)
    bad = _folder(tmp_path / "bad")
    (bad / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        load_splits(DataConfig(source=f"imagefolder:{bad}"), seed=0)
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    with pytest.raises(DataError, match="has no images"):
        load_splits(DataConfig(source=f"imagefolder:{empty}"), seed=0)


def test_python_factory():
    s = load_splits(DataConfig(source="python:tests.toolchain.user_factories:tabular"), seed=0)
    assert s.labels == ("low", "mid", "high") and s.input_spec.layout == "NF"
    assert s.input_spec.shape == (None, 12) and len(s.input_spec.mean) == 12
    x = s.input_spec.preprocess(s.train[0])
    assert np.allclose(x.mean(0), 0, atol=1e-4) and np.allclose(x.std(0), 1, atol=1e-3)


@pytest.mark.parametrize("src,err,msg", [
    ("python:tests.toolchain.user_factories:broken_data", DataError, "raised RuntimeError: database offline"),
    ("python:tests.toolchain.user_factories:bad_shape", DataError, "X must be"),
    ("python:tests.toolchain.user_factories:missing", ConfigError, "has no function 'missing'"),
    ("python:no_such_module_xyz:f", ConfigError, "cannot import module"),
    ("python:nocolon", ConfigError, "expected 'python:package.module:function'"),
])
def test_python_factory_errors(src, err, msg):
    with pytest.raises(err, match=msg):
        load_splits(DataConfig(source=src), seed=0)


def test_imagefolder_run_records_absolute_path_and_reloads(tmp_path, monkeypatch):
    """A mobilenet teacher on an image folder given by a relative path; the run reloads it from elsewhere."""
    from tests.fixtures.pipeline import tiny_config
    from toolchain.rundir import RunDir
    from toolchain.train import train

    _folder(tmp_path / "imgs", n=8)
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path / "run", data={"source": "imagefolder:imgs", "image_size": 12, "channels": 3},
                      teacher={"family": "mobilenet", "width": 8}, train={"epochs": 1})
    rep = train(cfg, tmp_path / "run")
    assert rep["epochs_run"] == 1
    monkeypatch.chdir("/")
    run = RunDir(tmp_path / "run")
    assert run.data_record()["source"] == f"imagefolder:{tmp_path / 'imgs'}"
    s = run.splits()
    assert s.labels == ("cat", "dog") and s.train[0].shape[1:] == (3, 12, 12)
    assert run.load_teacher()(__import__("torch").zeros(2, 3, 12, 12)).shape == (2, 2)


def test_mnist1d_is_generated_locally_deterministic_and_fits_the_image_families():
    import torch

    from toolchain.config import DataConfig, ModelConfig
    from toolchain.data import load_source
    from toolchain.models import build_model

    a, b = load_source(DataConfig(source="mnist1d")), load_source(DataConfig(source="mnist1d"))
    assert a.X.shape == (5000, 1, 1, 40) and a.X.dtype.name == "float32" and a.layout == "NCHW"
    assert sorted(set(a.y.tolist())) == list(range(10)) and a.sha256 == b.sha256
    for family in ("resnet", "mobilenet"):
        m = build_model(ModelConfig(family=family, width=8), input_shape=(1, 1, 40), num_classes=10).eval()
        assert m(torch.from_numpy(a.X[:3])).shape == (3, 10)


def test_a_calibration_split_too_small_to_fit_routing_on_is_not_carved():
    from toolchain.data import MIN_CALIBRATION_ROWS, RawData, split

    rng = np.random.default_rng(0)
    raw = RawData(X=rng.normal(size=(200, 4)).astype(np.float32), y=np.arange(200) % 2, labels=("a", "b"),
                  layout="NF", scale=1.0)
    s = split(raw, DataConfig(calibration_fraction=0.1), seed=0)  # 20 inputs would be too few
    assert len(s.calibration[1]) == 0 and len(s.train[1]) + len(s.val[1]) + len(s.test[1]) == 200
    big = split(RawData(X=np.tile(raw.X, (3, 1)), y=np.tile(raw.y, 3), labels=("a", "b"), layout="NF", scale=1.0),
                DataConfig(calibration_fraction=0.1), seed=0)
    assert len(big.calibration[1]) == 60 >= MIN_CALIBRATION_ROWS
