"""train: resume from the per-epoch checkpoint, DDP on 2 CPU processes, bad checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgecore.errors import ModelError
from tests.fixtures.pipeline import tiny_config
from toolchain.rundir import RunDir
from toolchain.train import train

REPO = Path(__file__).resolve().parents[2]


def _mini(run_dir, **train_kw):
    return tiny_config(run_dir, teacher={"width": 4, "depth": 1}, train={"epochs": 2, **train_kw})


def test_resume_continues_from_last_checkpoint(tmp_path):
    cfg = _mini(tmp_path / "r")
    first = train(cfg, tmp_path / "r")
    assert first["epochs_run"] == 2 and (tmp_path / "r/checkpoints/last.pt").is_file()
    more = tiny_config(tmp_path / "r", teacher={"width": 4, "depth": 1}, train={"epochs": 3})
    resumed = train(more, tmp_path / "r", resume=True)
    assert resumed["resumed"] and resumed["epochs_run"] == 3
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][:2] == first["history"]
    assert RunDir(tmp_path / "r").load_teacher() is not None


def test_resume_refuses_other_config_or_missing_checkpoint(tmp_path):
    with pytest.raises(ModelError, match="nothing to resume"):
        train(_mini(tmp_path / "x"), tmp_path / "x", resume=True)
    train(_mini(tmp_path / "y"), tmp_path / "y")
    other = tiny_config(tmp_path / "y", teacher={"width": 6, "depth": 1}, train={"epochs": 3})
    with pytest.raises(ModelError, match="another data set or teacher config"):
        train(other, tmp_path / "y", resume=True)


def test_corrupt_or_mismatched_checkpoint(tmp_path):
    train(_mini(tmp_path / "c"), tmp_path / "c")
    run = RunDir(tmp_path / "c")
    good = (tmp_path / "c/teacher.pt").read_bytes()
    (tmp_path / "c/teacher.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelError, match="corrupt or unreadable checkpoint"):
        run.load_teacher()
    import torch

    ck = torch.load(tmp_path / "c/checkpoints/last.pt", weights_only=False)
    torch.save(ck, tmp_path / "c/teacher.pt")  # a training state, not a teacher
    with pytest.raises(ModelError, match="not a teacher checkpoint"):
        run.load_teacher()
    with pytest.raises(ModelError, match="does not exist"):
        RunDir(tmp_path / "nope")


def test_early_stopping(tmp_path):
    cfg = tiny_config(tmp_path / "e", teacher={"width": 4, "depth": 1},
                      train={"epochs": 30, "lr": 1e-9, "patience": 1, "warmup_epochs": 0})
    r = train(cfg, tmp_path / "e")
    assert r["stopped_early"] and r["epochs_run"] < 30


def test_augmented_one_channel_batch_runs_the_network_nchw():
    """A shifted 1-channel batch must not read as channels_last: that sent the net down oneDNN's NHWC
    1x1 stride-2 backward-weights kernel, which corrupts the heap (SIGABRT in backward, see engine)."""
    import torch

    from toolchain.engine import shift_augment

    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    out = shift_augment(x)
    assert out.shape == x.shape and out.stride() == x.stride()
    conv = torch.nn.Conv2d(1, 4, 3, padding=1)
    assert conv(out).is_contiguous()  # NCHW all the way down, not NHWC
    assert not conv(out).is_contiguous(memory_format=torch.channels_last)
    shifted = [(out[i, 0] - x[i, 0]).abs().max() for i in range(len(x))]
    assert any(d > 0 for d in shifted)  # still augments


def test_ddp_two_cpu_processes(tmp_path):
    """`torchrun --nproc_per_node 2 ... train` on CPU (gloo): one run, world size 2."""
    cfg = tmp_path / "ddp.toml"
    cfg.write_text(
        '[teacher]\nwidth = 4\ndepth = 1\n[train]\nepochs = 2\nprogress = false\n'
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "toolchain.cli", "train", "--config", str(cfg), "--run-dir", str(tmp_path / "run"), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:  # kill the launcher and its workers (its own process group)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["world_size"] == 2 and report["epochs_run"] == 2
    assert json.loads((tmp_path / "run/reports/train.json").read_text())["world_size"] == 2
    assert RunDir(tmp_path / "run").load_teacher() is not None


def test_each_epoch_line_gives_the_rate_and_an_eta_bounded_by_early_stopping():
    from toolchain.engine import FitOptions, FitState, eta_text

    opts = FitOptions(epochs=30, lr=1e-3, patience=5)
    assert eta_text(2.0, FitState(epoch=3, bad_epochs=0), opts) == ", 2.0 s/epoch, ETA ≤ 10 s"  # patience bounds it
    assert eta_text(2.0, FitState(epoch=28, bad_epochs=0), opts) == ", 2.0 s/epoch, ETA ≤ 4 s"  # the epochs left do
    assert eta_text(30.0, FitState(epoch=0), FitOptions(epochs=30, lr=1e-3)) == ", 30.0 s/epoch, ETA ≤ 15.0 min"
    assert eta_text(2.0, FitState(epoch=30), opts) == ""
    assert eta_text(2.0, FitState(epoch=4, stopped_early=True), opts) == ""
