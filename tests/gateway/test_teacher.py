"""The gateway's heavy model: the teacher as ONNX (onnxruntime) or PyTorch, from the shared tiny run."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_gateway.teacher import load_teacher
from edgecore.errors import GatewayError


def test_onnx_and_torch_teachers_agree(tiny_run):
    from toolchain.rundir import RunDir

    x, y = RunDir(tiny_run).splits().test
    spec = RunDir(tiny_run).splits().input_spec
    onnx_t = load_teacher(tiny_run, prefer="onnx", threads=1)
    torch_t = load_teacher(tiny_run, prefer="torch", threads=1)
    assert onnx_t.sample_shape == torch_t.sample_shape == spec.sample_shape
    assert len(onnx_t.labels) == len(torch_t.labels) > 1
    xb = spec.preprocess(x)
    a, b = onnx_t.run(xb), torch_t.run(xb)
    assert a.shape == b.shape == (len(x), len(onnx_t.labels))
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.99
    assert np.abs(a - b).max() < 1e-2
    with pytest.raises(GatewayError, match="no teacher"):
        load_teacher(tiny_run / "reports")
    with pytest.raises(GatewayError, match="choose onnx or torch"):
        load_teacher(tiny_run, prefer="tf")


def _tiny_onnx(path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.eye(3, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


@pytest.mark.parametrize("data,why", [("{not json", "unreadable"), ('{"labels": ["a", "b"]}', "names 2 labels"),
                                      ('{"labels": ["cat", "dog", "owl"]}', None)])
def test_labels_from_an_unusable_data_json_are_numbered_logged_once_and_in_the_health(tmp_path, caplog, data, why):
    """A data.json that is there but unreadable (or for another number of classes) is not replaced silently by
    0..n-1: one warning, and the teacher's ``labels_source`` (shown by the gateway's health) says why."""
    import logging

    from cloud_gateway.config import GatewayConfig, WorkerConfig
    from cloud_gateway.service import Gateway

    _tiny_onnx(tmp_path / "teacher.onnx")
    (tmp_path / "data.json").write_text(data)
    with caplog.at_level(logging.WARNING, logger="cloud_gateway.teacher"):
        teacher = load_teacher(tmp_path / "teacher.onnx")
    warned = [r.getMessage() for r in caplog.records if "teacher labels" in r.getMessage()]
    gw = Gateway(GatewayConfig(worker=WorkerConfig(broker_url="mqtt://127.0.0.1:1"), teacher=tmp_path / "teacher.onnx",
                               db=str(tmp_path / "g.sqlite"), http_port=None), teacher=teacher)
    try:
        health = gw._health()
    finally:
        gw.stop()
    if why is None:
        assert teacher.labels == ["cat", "dog", "owl"] and not warned
        assert health["teacher_labels"] == str(tmp_path / "data.json")
    else:
        assert teacher.labels == ["0", "1", "2"] and len(warned) == 1 and why in warned[0], warned
        assert health["teacher_labels"].startswith("numbered 0..2") and why in health["teacher_labels"]


def _tiny_detector_onnx(path, anchors: int, channels: int) -> None:
    """(N, 3, 16, 16) -> (N, anchors, channels): a detector's raw output shape (the values do not matter)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    shape = numpy_helper.from_array(np.array([1, anchors, channels], np.int64), "shape")
    flat = numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "flat")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2, 3], keepdims=1),
         helper.make_node("Reshape", ["m", "flat"], ["r"]), helper.make_node("Expand", ["r", "shape"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, anchors, channels])], [shape, flat])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))


@pytest.mark.parametrize("extra,named", [(0, True), (1, False)])
def test_a_detectors_labels_are_checked_against_its_task_not_its_last_axis(tmp_path, caplog, extra, named):
    """A detector's raw output is (A, 4 + C): its labels fit when the task's output shape is the teacher's (not
    when there are 4 + C of them); a teacher whose output the run's task does not describe gets numbered ones."""
    import json
    import logging

    from edgecore.detect import DecodeParams

    params = DecodeParams(input_size=(16, 16), strides=(8, 16, 32), num_classes=2)
    _tiny_detector_onnx(tmp_path / "teacher.onnx", params.num_anchors + extra, params.channels)
    (tmp_path / "data.json").write_text(json.dumps({"labels": ["car", "person"],
                                                    "task": {"name": "detect", "params": params.to_dict()}}))
    with caplog.at_level(logging.WARNING, logger="cloud_gateway.teacher"):
        teacher = load_teacher(tmp_path / "teacher.onnx")
    warned = [r.getMessage() for r in caplog.records if "teacher labels" in r.getMessage()]
    assert teacher.task.name == "detect"
    if named:
        assert teacher.labels == ["car", "person"] and not warned
        assert teacher.labels_source == str(tmp_path / "data.json")
    else:
        assert len(warned) == 1 and "outputs of shape (7, 6)" in warned[0], warned
        assert teacher.labels_source.startswith("numbered")
