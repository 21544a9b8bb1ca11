"""``task = "detect"`` through the pipeline: train -> compress -> export -> build -> verify on the generated
``shapes`` set (64x64, a few epochs: mAP is low and need not be high), a YOLO folder through train, and the
config errors of a source that does not fit the task.

The tiny run (`det_run`, tests/fixtures/detection.py) is built once and cached.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from edgecore.errors import AccuracyGateError, ConfigError
from tests.fixtures.detection import BUDGET_PT, detect_config


def _build_cfg(**kw: Any) -> Any:
    from toolchain.config import BuildConfig

    return BuildConfig(**{"accuracy_budget_pt": BUDGET_PT, "calibration_samples": 64, **kw})


def test_detect_run_goes_through_train_compress_export(det_run):
    from edgecore.detect import DecodeParams
    from toolchain.rundir import RunDir

    run = RunDir(det_run)
    rec = run.data_record()
    assert rec["task"]["name"] == "detect"
    params = DecodeParams.from_dict(rec["task"]["params"])
    assert params.input_size == (64, 64) and params.strides == (8, 16, 32) and params.num_classes == 4
    splits = run.splits()  # reloads deterministically (sha256 checked)
    y = splits.test[1]
    assert y.dtype == np.float32 and y.ndim == 3 and y.shape[2] == 5 and (y[:, 0, 0] >= 0).all()
    train = run.report("train")
    compress = run.report("compress")
    export = run.report("export")
    assert train["test_accuracy"] > 0.02, train["test_accuracy"]  # mAP@0.5:0.95: it learned something
    assert [s["stage"] for s in compress["stages"]] == ["teacher", "pruned", "distilled", "qat"]
    assert compress["macs_reduction"] > 1.5
    assert export["models"]["student"]["max_abs_logit_diff"] < 1e-3
    assert export["models"]["student"]["agreement"] > 0.97  # boxes: ORT reproduces PyTorch's
    assert export["models"]["student_qdq"]["quantize_nodes"] > 0


def test_detect_bundles_build_gate_and_verify(det_run):
    from edgecore.bundle import open_bundle
    from edgecore.tasks import get_task
    from toolchain.bundle import build_bundle
    from toolchain.reference import reference_for
    from toolchain.verify import verify_bundle

    rec = json.loads((det_run / "data.json").read_text())
    results = {}
    for precision in ("fp32", "int8"):
        rep = build_bundle(run_dir=det_run, target="onnx", precision=precision, cfg=_build_cfg())
        m = open_bundle(rep["bundle"]).manifest
        assert m.task.name == "detect" and dict(m.task.params) == rec["task"]["params"]
        assert rep["verify"]["status"] == "passed"
        assert rep["routing"]["threshold"] is not None
        results[precision] = rep
        again = verify_bundle(rep["bundle"], run_dir=det_run)
        assert again["status"] == "passed"
    fp32, int8 = results["fp32"]["metrics"], results["int8"]["metrics"]
    assert fp32["accuracy"] == pytest.approx(fp32["reference_accuracy"], abs=1e-3)
    assert fp32["agreement"] > 0.97
    assert int8["reference_accuracy"] - int8["accuracy"] <= BUDGET_PT / 100
    assert results["int8"]["calibration"]["method"] == "random"  # boxes have no one class to stratify on

    # the device's answer for one image, from the bundle's own task block
    task = get_task(open_bundle(results["fp32"]["bundle"]).manifest.task)
    ref = reference_for(det_run)
    answer = task.answer(ref.student_test[0], ref.labels)
    assert answer["detections"] and set(answer["detections"][0]) == {"box", "score", "class", "label"}
    print(f"\nmAP@0.5:0.95 teacher {json.loads((det_run / 'reports/train.json').read_text())['test_accuracy']:.4f}, "
          f"student fp32 {fp32['accuracy']:.4f}, int8 {int8['accuracy']:.4f} (box agreement {int8['agreement']:.3f})")


def test_detect_tflite_int8_passes_the_gate(det_run):
    """The head ends in ``cat([relu(box), cls])``: the cat's shared observer keeps the negative class logits."""
    from targets import get_target
    from toolchain.bundle import build_bundle

    target = get_target("tflite")
    for ok, why in (target.build_available(), target.available()):
        if not ok:
            pytest.skip(why)
    rep = build_bundle(run_dir=det_run, target="tflite", precision="int8", cfg=_build_cfg())
    assert rep["verify"]["status"] == "passed"
    m = rep["metrics"]
    assert m["reference_accuracy"] - m["accuracy"] <= BUDGET_PT / 100
    print(f"\ntflite int8 mAP@0.5:0.95 {m['accuracy']:.4f} (reference {m['reference_accuracy']:.4f}, "
          f"box agreement {m['agreement']:.3f})")


def test_the_gate_fails_when_an_artifact_loses_more_map_than_the_budget(det_run):
    """Every box one stride wider on each side in the ONNX graph: mAP falls far below the PyTorch reference."""
    import onnx
    from onnx import numpy_helper

    from toolchain.bundle import build_bundle

    path = det_run / "student.onnx"
    model = onnx.load(str(path))
    (bias,) = [i for i in model.graph.initializer if i.name.endswith("box_pred.bias")]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(1.0), bias.name))
    onnx.save(model, str(path))
    with pytest.raises(AccuracyGateError, match=r"mAP@0\.5:0\.95 .* below the PyTorch reference"):
        build_bundle(run_dir=det_run, target="onnx", precision="fp32", cfg=_build_cfg(), out=det_run / "bad")
    assert not (det_run / "bad").exists()


def test_a_yolo_folder_trains(tmp_path):
    from toolchain.detection.formats import write_yolo_folder
    from toolchain.detection.shapes import generate
    from toolchain.rundir import RunDir
    from toolchain.train import train

    write_yolo_folder(generate(40, size=64, seed=3), tmp_path / "yolo")
    cfg = detect_config(tmp_path / "run", data={"source": f"yolo:{tmp_path / 'yolo'}", "count": 1000},
                        train={"epochs": 1})
    report = train(cfg)
    run = RunDir(tmp_path / "run")
    assert run.data_record()["task"]["name"] == "detect"
    assert run.labels == ("circle", "square", "triangle", "star")  # from the folder's data.yaml
    assert report["epochs_run"] == 1 and run.load_teacher() is not None
    assert len(run.splits().train[1]) == report["data"]["splits"]["train"]


@pytest.mark.parametrize("sections, match", [
    ({"task": {"name": "classify"}}, r"data\.source 'shapes' is a detect source but task\.name is 'classify'"),
    ({"data": {"source": "digits"}}, r"data\.source 'digits' is a classify source but task\.name is 'detect'"),
    ({"data": {"source": "yolo:/no/such/folder"}}, r"data\.source: YOLO folder '/no/such/folder' does not exist"),
    ({"data": {"source": "coco:/no/such.json"}}, r"COCO annotations file '/no/such.json' does not exist"),
    ({"data": {"source": "pascal:/x"}}, r"data\.source: expected one of .*'shapes', 'yolo:PATH'"),
    ({"data": {"count": 2}}, r"data\.count: must be >= 3"),
    ({"teacher": {"head_convs": 9}}, r"teacher\.head_convs: must be in \[0, 8\]"),
])
def test_config_errors_name_the_key(tmp_path, sections, match):
    with pytest.raises(ConfigError, match=match):
        detect_config(tmp_path, **sections)
