"""export: ONNX files pass the checker and agree with PyTorch in ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from toolchain.export import ort_logits
from toolchain.rundir import RunDir


def test_onnx_files_pass_checker_and_have_contract_io(tiny_run):
    for name in ("student.onnx", "student_qdq.onnx", "teacher.onnx"):
        m = onnx.load(str(tiny_run / name))
        onnx.checker.check_model(m, full_check=True)
        assert [i.name for i in m.graph.input] == ["input"] and [o.name for o in m.graph.output] == ["logits"]
        assert not m.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")  # dynamic batch
        assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in m.graph.initializer)


def test_fp32_onnx_matches_pytorch(tiny_run):
    run = RunDir(tiny_run)
    s = run.splits()
    X = s.input_spec.preprocess(s.test[0])
    for name, model in (("student.onnx", run.load_student()), ("teacher.onnx", run.load_teacher())):
        with torch.no_grad():
            ref = model(torch.from_numpy(X)).numpy()
        got = ort_logits(tiny_run / name, X)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
        one = ort_logits(tiny_run / name, X[:1])  # batch of one works too
        np.testing.assert_allclose(one, ref[:1], atol=1e-4, rtol=1e-4)


def test_qdq_onnx_agrees_with_qat_program(tiny_run):
    run = RunDir(tiny_run)
    s = run.splits()
    X = s.input_spec.preprocess(s.test[0])
    qat = run.load_student_qat()
    with torch.no_grad():
        ref = qat(torch.from_numpy(X)).numpy()
    got = ort_logits(tiny_run / "student_qdq.onnx", X)
    agreement = float((got.argmax(1) == ref.argmax(1)).mean())
    assert agreement >= 0.95
    assert float(np.abs(got - ref).max()) < 0.5 * float(np.abs(ref).max())
    ops = {n.op_type for n in onnx.load(str(tiny_run / "student_qdq.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_export_report_keys(tiny_run):
    rep = json.loads((tiny_run / "reports/export.json").read_text())
    assert set(rep["models"]) == {"student", "student_qdq", "teacher"}
    assert rep["qdq_weight_bits"] in (7, 8)
    assert rep["models"]["student"]["max_abs_logit_diff"] < 1e-3


def test_export_refuses_a_run_without_student(tmp_path, tiny_run):
    import shutil

    from edgecore.errors import ModelError
    from tests.fixtures.pipeline import tiny_config
    from toolchain.export import export

    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    (run / "student.pt").unlink()
    (run / "student.onnx").unlink()
    with pytest.raises(ModelError, match="has no student.pt"):
        export(tiny_config(run), run, show=False)
    assert not (run / "student.onnx").exists()
