"""CLI: --json prints the report as the last stdout line and writes reports/<cmd>.json."""

from __future__ import annotations

import json
import shutil

from toolchain.cli import main


def test_export_json_last_line(tiny_run, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    (run / "reports/export.json").unlink()
    rc = main(["export", "--run-dir", str(run), "--config", str(run / "config.toml"), "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    report = json.loads(out[-1])
    assert report["command"] == "export" and "student_qdq" in report["models"]
    assert json.loads((run / "reports/export.json").read_text())["models"] == report["models"]


def test_compress_missing_run_is_one_line(tmp_path, capsys):
    rc = main(["compress", "--run-dir", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "does not exist" in err[0]


def test_a_model_the_pruner_cannot_handle_is_one_line_naming_the_layer(tmp_path, capsys):
    args = ["--run-dir", str(tmp_path / "r"), "--set", 'teacher.family="python:tests.toolchain.user_factories:rigid_attention_net"',
            "--set", "train.epochs=1", "--set", "train.progress=false", "--set", 'compress.control="none"']
    assert main(["train", *args]) == 0
    capsys.readouterr()
    rc = main(["compress", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "attention layer 'attn' (RigidAttention: no head count found)" in err[0]
    assert 'leave "prune" out of compress.passes' in err[0]
