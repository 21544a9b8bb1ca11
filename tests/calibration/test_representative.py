from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calibration.representative import (
    build_representative_set,
    load_representative_set,
    select_stratified,
)
from edgecore.errors import DataError
from targets.calibration_data import (
    litert_representative_dataset,
    nncf_dataset,
    ort_data_reader,
)


def _data(n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    y = rng.choice(5, size=n, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    return rng.normal(size=(n, 3, 4, 4)).astype(np.float32), y


def test_stratified_selection_follows_class_shares() -> None:
    x, y = _data()
    idx = select_stratified(y, 100, seed=0)
    assert len(idx) == 100 and len(set(idx)) == 100 and np.all(np.diff(idx) > 0)
    got = np.bincount(y[idx], minlength=5) / 100
    want = np.bincount(y, minlength=5) / len(y)
    assert np.abs(got - want).max() <= 0.02
    assert np.array_equal(idx, select_stratified(y, 100, seed=0))  # deterministic
    assert set(y[select_stratified(y, 5, seed=0)]) == set(range(5))  # every class at least once


def test_stored_once_with_hash_and_reused(tmp_path: Path) -> None:
    x, y = _data()
    p = tmp_path / "rep.npz"
    a = build_representative_set(inputs=x, labels=y, n=64, path=p)
    mtime = p.stat().st_mtime_ns
    b = build_representative_set(inputs=x, labels=y, n=64, path=p)
    assert p.stat().st_mtime_ns == mtime, "an identical set must not be rewritten"
    assert a.sha256 == b.sha256 == load_representative_set(p).sha256
    assert a.provenance() == {"dataset_sha256": a.sha256, "samples": 64, "method": "class-stratified"}


def test_tampered_set_is_refused(tmp_path: Path) -> None:
    x, y = _data()
    p = tmp_path / "rep.npz"
    rep = build_representative_set(inputs=x, labels=y, n=32, path=p)
    np.savez(p, inputs=rep.inputs + 1, labels=rep.labels, indices=rep.indices, sha256=np.array(rep.sha256),
             method=np.array(rep.method))
    with pytest.raises(DataError, match="does not match its sha256"):
        load_representative_set(p)
    p.write_bytes(b"junk")
    with pytest.raises(DataError, match="not a readable calibration set"):
        load_representative_set(p)


def test_adapters_feed_every_sample_once() -> None:
    x, y = _data(200)
    rep = build_representative_set(inputs=x, labels=y, n=20)
    reader = ort_data_reader(rep, input_name="input")
    seen = []
    while (item := reader.get_next()) is not None:
        seen.append(item["input"])
    assert len(seen) == 20 and seen[0].shape == (1, 3, 4, 4)
    reader.rewind()
    assert reader.get_next() is not None
    assert sum(1 for _ in nncf_dataset(rep).get_inference_data()) == 20
    assert sum(1 for _ in litert_representative_dataset(rep)()) == 20
