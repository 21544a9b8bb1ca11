"""``python:`` factories are found next to the config file, and later commands find them from anywhere."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from tests.fixtures.pipeline import tiny_config
from toolchain.cli import main
from toolchain.config import to_toml

_MODULE = textwrap.dedent('''
    import numpy as np

    def load():
        rng = np.random.default_rng(1)
        y = np.repeat(np.arange(3), 80)
        X = rng.normal(size=(240, 6)).astype(np.float32)
        X[:, 0] += y * 8.0  # easy: student and teacher both get the validation split right
        return X, y, ["a", "b", "c"]

    def model(*, input_shape, num_classes):
        import torch.nn as nn

        return nn.Sequential(nn.Linear(input_shape[0], 24), nn.ReLU(), nn.Linear(24, num_classes))
''')


def _fresh_process(monkeypatch: pytest.MonkeyPatch, cwd: Path) -> None:
    """What a new shell command sees: the user's module not imported, no folder of ours on sys.path."""
    monkeypatch.chdir(cwd)
    sys.modules.pop("mydata_factories", None)


@pytest.fixture
def restore_sys_path():
    saved = list(sys.path)
    yield
    sys.path[:] = saved
    sys.modules.pop("mydata_factories", None)


def test_factory_module_next_to_config_works_from_other_directories(tmp_path, monkeypatch, restore_sys_path):
    project, elsewhere, later = (tmp_path / n for n in ("project", "elsewhere", "later"))
    for d in (project, elsewhere, later):
        d.mkdir()
    (project / "mydata_factories.py").write_text(_MODULE)
    run_dir = tmp_path / "run"
    cfg = tiny_config(
        run_dir, data={"source": "python:mydata_factories:load", "batch_size": 32},
        teacher={"family": "python:mydata_factories:model"}, prune={"ratio": 2.0, "target": "params"},
        train={"epochs": 30, "patience": 30}, distill={"epochs": 10, "patience": 10},
    )
    (project / "toolchain.toml").write_text(to_toml(cfg))

    _fresh_process(monkeypatch, elsewhere)  # train from a folder that has neither config nor module
    assert main(["train", "--config", str(project / "toolchain.toml")]) == 0
    record = json.loads((run_dir / "data.json").read_text())
    assert record["python_dirs"][0] == str(project.resolve())

    # every later command runs in a fresh process from a third folder whose own
    # toolchain.toml names the module too, but only the run's record can find it
    (later / "toolchain.toml").write_text(to_toml(cfg))
    for argv in (
        ["compress", "--run-dir", str(run_dir)],
        ["export", "--run-dir", str(run_dir)],
        ["build", "--run", str(run_dir), "-t", "onnx", "-p", "fp32", "--out", str(tmp_path / "bundle")],
        ["verify", str(tmp_path / "bundle")],
    ):
        sys.path[:] = [p for p in sys.path if p not in (str(project.resolve()), str(elsewhere.resolve()))]
        _fresh_process(monkeypatch, later)
        assert main(argv) == 0, argv

    # issue 15, item 5: a 36-sample validation split the student gets right like the teacher. Routing stays
    # on (the budget goes to the least confident inputs), T is bounded, and the manifest says so.
    r = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["routing"]
    assert r["edge_accuracy"] == r["cloud_accuracy"] == 1.0
    assert r["rule"] == "budget_quantile" and "36-sample validation split" in r["rule_reason"]
    assert r["threshold"] > 0 and r["expected_offload"] == pytest.approx(3 / 36)
    assert r["temperature_bounds"] == [0.5, 2.0] and 0.5 <= r["temperature"] <= 2.0


def test_missing_factory_module_names_where_it_looked(tmp_path, monkeypatch, restore_sys_path, capsys):
    (tmp_path / "toolchain.toml").write_text('[data]\nsource = "python:no_such_user_module:load"\n')
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "cannot import module 'no_such_user_module'" in err and str(tmp_path.resolve()) in err
