"""Compression as passes: the registry, and pass lists other than the default."""

from __future__ import annotations

import shutil

import pytest

from edgecore.errors import ConfigError
from tests.fixtures.pipeline import tiny_config
from toolchain import pipeline
from toolchain.passes import PASS_MODULES, get_pass
from toolchain.passes.base import Pass
from toolchain.rundir import RunDir

STAGE = {"prune": "pruned", "distill": "distilled", "qat": "qat", "ptq": "ptq"}


def test_registry_imports_each_pass_on_demand_and_names_the_known_ones():
    for name in PASS_MODULES:
        cls = get_pass(name)
        assert issubclass(cls, Pass) and cls.name == name and Pass.registry[name] is cls
        assert cls.section in ("prune", "distill", "qat", "ptq")
    assert get_pass("qat").quantizes and get_pass("ptq").quantizes and not get_pass("distill").quantizes
    with pytest.raises(ConfigError, match=r"unknown compression pass 'sparsify' \(known: prune, distill, qat, ptq\)"):
        get_pass("sparsify")


def test_each_pass_owns_its_config_section_and_says_once_that_it_quantizes(monkeypatch):
    import typing

    from toolchain.config import Config
    from toolchain.passes import pass_list_problem

    hints = typing.get_type_hints(Config)
    for name in PASS_MODULES:
        cls = get_pass(name)
        section = hints[cls.section]
        # the section's dataclass (and its validate) lives in the pass's module, not in toolchain.config
        assert section.__module__ == cls.__module__, (name, section.__module__)
        assert "validate" in vars(section), name
    assert pass_list_problem(["distill", "qat"]) is None
    # the pass-list check reads Pass.quantizes: a pass that says it quantizes must come last
    monkeypatch.setattr(get_pass("distill"), "quantizes", True)
    assert pass_list_problem(["distill", "prune"]) == (
        "'distill' must be the last pass (nothing can train or prune a quantized program)")
    assert pass_list_problem(["distill", "qat"]) == "at most one quantizing pass (distill or qat or ptq)"


def test_reading_a_config_imports_no_torch():
    """The config gathers the passes' sections from their modules: those modules import torch lazily."""
    import subprocess
    import sys

    code = ("import sys, toolchain.config as c; c.load_config(None, overrides=['compress.passes=[\"prune\", \"ptq\"]']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchao', 'torch_pruning')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _copy_run(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    return run_dir


def test_distill_only_keeps_the_architecture_and_leaves_no_quantized_program(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path)
    assert (run_dir / RunDir.STUDENT_QAT).is_file()  # from the default passes: must go, it is stale
    cfg = tiny_config(run_dir, compress={"passes": ["distill"], "control": "none"})
    rep = pipeline.compress(cfg, run_dir, show=False)
    assert [s["stage"] for s in rep["stages"]] == ["teacher", "distilled"]
    assert "prune" not in rep and "qat" not in rep and rep["distill"]["epochs_run"] >= 1
    assert rep["stages"][1]["macs"] == rep["stages"][0]["macs"] and rep["quantization"] is None
    assert rep["qdq_weight_bits"] is None and rep["qat_accuracy"] is None
    assert rep["control"] == {"kind": "none"} and rep["alternatives"] == []
    assert not (run_dir / RunDir.STUDENT_QAT).exists() and not (run_dir / RunDir.STUDENT_QDQ).exists()
    exp = pipeline.export(cfg, run_dir, show=False)
    assert set(exp["models"]) == {"student", "teacher"} and exp["student_qdq_ort_accuracy"] is None
    assert RunDir(run_dir).model_source().onnx_qdq is None
    assert exp["student_fp32_ort_accuracy"] == pytest.approx(rep["student_accuracy"], abs=0.01)


def test_prune_then_ptq_gives_a_quantized_program_without_training(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path)
    cfg = tiny_config(run_dir, compress={"passes": ["prune", "ptq"]}, ptq={"calibration_samples": 200})
    rep = pipeline.compress(cfg, run_dir, show=False)
    assert [s["stage"] for s in rep["stages"]] == ["teacher", "pruned", "ptq"]
    assert "distill" not in rep and rep["quantization"] == "ptq"
    assert rep["ptq"]["calibration_samples"] == 200 and rep["ptq"]["batchnorm_left"] == 0
    assert rep["macs_reduction"] >= 3.0 and rep["stages"][2]["macs"] == rep["stages"][1]["macs"]
    assert rep["qdq_weight_bits"] in (7, 8) and rep["stages"][2]["quantized"]
    # PTQ costs a little accuracy at most on this model, never the whole model
    assert rep["qat_accuracy"] >= rep["student_accuracy"] - 0.1
    exp = pipeline.export(cfg, run_dir, show=False)
    q = exp["models"]["student_qdq"]
    assert q["quantize_nodes"] > 0 and q["agreement"] >= 0.9
    assert RunDir(run_dir).model_source().onnx_qdq is not None


def test_a_failing_pass_changes_nothing_in_the_run(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    cfg = tiny_config(run_dir, prune={"ratio": 1000.0, "target": "params"})
    from edgecore.errors import CompressionError

    with pytest.raises(CompressionError, match="pruning target unreachable"):
        pipeline.compress(cfg, run_dir, show=False)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_mobilenet_student_of_a_resnet_teacher_is_reported_beside_the_pruned_teacher(tiny_run, tmp_path, capsys):
    from toolchain.models import MobileNet, count_macs
    from toolchain.report import print_compress

    run_dir = _copy_run(tiny_run, tmp_path)
    # 179k MACs as built: above the 3x target (67k), so the prune pass prunes it
    cfg = tiny_config(run_dir, student={"family": "mobilenet", "width": 8, "dropout": 0.0},
                      distill={"epochs": 4, "patience": 4})
    rep = pipeline.compress(cfg, run_dir, show=False)
    names = [s["stage"] for s in rep["stages"]]
    assert names == ["teacher", "student (mobilenet, untrained)", "pruned", "distilled", "qat"]
    assert rep["student_family"] == "mobilenet" and rep["prune"]["pruned"] and rep["macs_reduction"] >= 3.0
    untrained, distilled = rep["stages"][1], rep["stages"][3]
    assert untrained["macs"] > rep["stages"][0]["macs"] / 3 >= distilled["macs"]
    assert distilled["test_accuracy"] > untrained["test_accuracy"] + 0.2  # it learned from the teacher
    student = RunDir(run_dir).load_student()
    assert isinstance(student, MobileNet) and count_macs(student, (1, 8, 8)) == distilled["macs"]
    alt, control = rep["alternatives"]  # the pruned teacher, then the scratch control (on by default)
    assert control["name"] == "scratch control" and control["stages"][0]["macs"] == distilled["macs"]
    assert alt["name"] == "pruned teacher" and alt["passes"] == ["prune", "distill"]
    assert [s["stage"] for s in alt["stages"]] == ["pruned teacher: pruned", "pruned teacher: distilled"]
    print_compress(rep)
    table = capsys.readouterr().out
    assert "student (mobilenet, untrained)" in table and "pruned teacher: distilled" in table
    exp = pipeline.export(cfg, run_dir, show=False)
    assert exp["models"]["student_qdq"]["quantize_nodes"] > 0


def test_scratch_control_is_reported_and_says_plainly_when_compression_bought_nothing(tiny_run):
    import json

    from toolchain.passes.control import reinitialise, verdict

    rep = json.loads((tiny_run / "reports/compress.json").read_text())
    c = rep["control"]
    assert c["kind"] == "scratch" and c["epochs"] == 1 * 1 + 2  # tiny config: 1 prune step x 1 epoch + 2 distill
    # compute-matched: the same optimisation steps as prune + distill, on distillation's view
    per_epoch = rep["distill"]["steps_per_epoch"]
    assert c["compressed_steps"]["total"] == c["steps"] == c["steps_run"] == 3 * per_epoch
    assert c["compressed_steps"]["distill"] == rep["distill"]["steps"] == 2 * per_epoch
    assert c["view"] == rep["distill"]["recipe"]["view"]
    assert c["gain_pt"] == pytest.approx((rep["student_accuracy"] - c["test_accuracy"]) * 100, abs=0.01)
    alt = rep["alternatives"][-1]
    assert alt["name"] == "scratch control" and alt["stages"][0]["macs"] == rep["stages"][2]["macs"]
    assert c["verdict"].startswith("compression bought " + ("nothing" if c["gain_pt"] <= 0 else "+"))
    row = {"test_accuracy": 0.9}
    assert verdict(1.5, row, 12) == "compression bought +1.50 pt over training the same architecture from scratch (12 epochs: 90.00%)"
    assert "bought nothing" in verdict(-2.0, row, 12) and "2.00 pt above the compressed student" in verdict(-2.0, row, 12)
    assert "the same as the compressed student" in verdict(0.0, row, 12)
    student = RunDir(tiny_run).load_student()
    fresh = reinitialise(student, 0)
    import torch

    assert type(fresh) is type(student) and not torch.equal(fresh.fc.weight, student.fc.weight)
    assert fresh.fc.weight.shape == student.fc.weight.shape


def test_a_student_already_within_the_ratio_is_not_called_pruned():
    """Another, smaller family: the prune pass passes it on untouched, and its compress row says so."""
    from toolchain.config import Config
    from toolchain.passes import get_pass

    prune = get_pass("prune")(Config())
    assert prune.stage_for({"pruned": True}) == "pruned"
    assert prune.stage_for({"pruned": False}) == "not pruned (already within prune.ratio)"
    assert get_pass("distill")(Config()).stage_for({}) == "distilled"
