"""The loop for detection: collected frames become training targets (a person's kept boxes, else the teacher's
boxes above ``refresh.min_box_score``), and ``toolchain refresh`` continues the detector on them, gates it in mAP
and builds its bundle. Built on the tiny `det_run` (tests/fixtures/detection.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgecore.samples import Sample
from toolchain.refresh import RefreshError
from toolchain.refresh.refresh_set import build_refresh_set
from toolchain.rundir import RunDir


def _det(box, score, cls, label="x"):
    return {"box": [float(v) for v in box], "score": score, "class": cls, "label": label}


def _sample(i: int, x: np.ndarray, dets: list[dict], kept: list[int] | None = None) -> Sample:
    human = None if kept is None else {"detections": [dets[k] for k in kept], "accepted": kept}
    return Sample(id=i, device="cam-1", received=1e9 + i, input=x[None], teacher_probs=np.zeros(0, np.float32),
                  teacher_answer={"detections": dets}, human_answer=human, confidence=0.3, drift=True)


def test_collected_frames_become_box_targets(det_run):
    run = RunDir(det_run)
    spec = run.input_spec
    x = spec.preprocess(run.splits().test[0][:24]).astype(np.float32)
    sure, unsure = _det([4, 4, 20, 20], 0.9, 1), _det([30, 30, 50, 52], 0.3, 2)
    samples = [_sample(i + 1, x[i], [sure, unsure], kept=[1] if i % 4 == 0 else None) for i in range(24)]
    rs = build_refresh_set(samples, spec, 4, holdout=0.25, seed=0, balance="oversample", min_samples=10,
                           task=run.task, min_box_score=0.5)
    assert rs.y_train.ndim == 3 and rs.y_train.shape[2] == 5 and len(rs.y_train) == len(rs.ids_train) == 18
    assert rs.notes["min_box_score"] == 0.5
    by_id = dict(zip(rs.ids_train, rs.y_train))
    for sid, y in by_id.items():
        objs = y[y[:, 0] >= 0]
        if (sid - 1) % 4 == 0:  # a person kept the unsure box only: it is the target, the sure one is not
            assert objs[:, 0].tolist() == [2] and objs[0, 1:].tolist() == [30, 30, 50, 52]
        else:  # the teacher's boxes at least 0.5 sure
            assert objs[:, 0].tolist() == [1] and objs[0, 1:].tolist() == [4, 4, 20, 20]
    assert rs.human_labels == 6
    # the raw inputs come back (the samples hold the preprocessed frames)
    np.testing.assert_allclose(spec.preprocess(rs.x_train), x[np.array(rs.ids_train) - 1], atol=1e-4)
    bad = [_sample(100, x[0] + 0.5, [_det([4, 4, 20, 20], 0.9, 7)])]  # (another input: not a duplicate)
    with pytest.raises(RefreshError, match="sample 100: class 7 outside the run's 4 classes"):
        build_refresh_set(samples + bad, spec, 4, holdout=0.25, seed=0, balance="none", min_samples=10,
                          task=run.task)
    foreign = [dataclass_replace(samples[0], id=101, teacher_answer=None, human_answer=None)]
    with pytest.raises(RefreshError, match="sample 101 from cam-1: no detections in its answer"):
        build_refresh_set(samples[1:] + foreign, spec, 4, holdout=0.25, seed=0, balance="none", min_samples=10,
                          task=run.task)


def dataclass_replace(s: Sample, **kw) -> Sample:
    import dataclasses

    return dataclasses.replace(s, **kw)


def test_refresh_continues_the_detector_on_drifted_frames_through_the_gateways_store(det_run, tmp_path):
    """Drifted frames answered by the teacher, stored by the gateway's collector (the real path), then
    ``toolchain refresh`` from that database: the new run's splits carry the frames, the gates are in mAP, the
    bundle is built."""
    import torch

    from cloud_gateway.collection import SampleCollector
    from cloud_gateway.config import CollectionPolicy
    from cloud_gateway.metrics import Metrics
    from cloud_gateway.store import GatewayStore
    from edgecore.tasks import get_task
    from toolchain.config import from_dict, load_config, to_dict, to_toml
    from toolchain.detection.shapes import generate
    from toolchain.refresh import refresh

    parent = tmp_path / "parent"
    shutil.copytree(det_run, parent)
    raw = to_dict(load_config(parent / "config.toml"))
    raw["refresh"].update({"epochs": 2, "candidates": 1, "strategy": "continue", "max_regression_pt": 100.0,
                           "min_samples": 10})
    (parent / "config.toml").write_text(to_toml(from_dict(raw, origin="test")))
    run = RunDir(parent)
    task = get_task(run.data_record()["task"])
    frames = generate(48, size=64, seed=7, drift="all")
    x = run.input_spec.preprocess(frames.images.astype(np.float32)).astype(np.float32)
    with torch.inference_mode():
        out = run.load_teacher()(torch.from_numpy(x)).numpy()
    db = tmp_path / "gw.sqlite"
    store = GatewayStore(db)
    col = SampleCollector(store, CollectionPolicy.parse("all"), Metrics(), task=task).start()
    for xi, oi in zip(x, out):
        col.offer("cam-1", xi[None], task.answer(oi, run.labels), confidence=0.2, flagged=True)
    col.flush()
    col.stop()

    rep = refresh(parent=parent, out=tmp_path / "new", source=str(db), targets=["onnx-fp32"], show=False, force=True)
    new = RunDir(tmp_path / "new")
    assert rep["samples"]["pulled"] == 48 and rep["samples"]["min_box_score"] == 0.5
    assert rep["samples"]["train"] + rep["samples"]["holdout"] == 48
    splits = new.splits()
    assert len(splits.train[1]) == len(run.splits().train[1]) + rep["samples"]["train"]
    assert splits.train[1].ndim == 3 and splits.train[1].shape[2] == 5  # boxes, padded to the widest frame
    gates = {g["gate"]: g for g in rep["gates"]}
    orig = gates["original test split"]
    assert 0.0 <= orig["before"] <= 1.0 and 0.0 <= orig["after"] <= 1.0  # mAP, not an argmax over boxes
    assert orig["before"] == pytest.approx(run.report("compress")["qat_accuracy"], abs=1e-6)  # the shipped int8
    held = gates["held-out collected samples, onnx-fp32"]
    assert 0.0 <= held["after"] <= 1.0 and held["versus"] == "parent model (PyTorch)"
    assert (tmp_path / "new" / "bundles" / "onnx-fp32" / "manifest.json").is_file()
