"""A device installs `edge-toolchain[agent,agent-tflite]` and runs a TFLite bundle with no converter on board.

A fresh virtualenv (no system site packages) gets the project's wheel and its
`agent` + `agent-tflite` requirements from a local wheelhouse only
(``pip install --no-index``); the wheelhouse is filled once by ``pip download``
(kept in pytest's cache). In that venv torch, jax and tensorflow must not be
importable, and `device-agent run` must answer a signed TFLite bundle's inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = ("agent", "agent-tflite")
CONVERTERS = ("torch", "jax", "tensorflow", "litert_torch", "nncf", "tf_keras")


def _requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return reqs


def _run(cmd: list[str], *, timeout: float = 600, **kw) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def _wheelhouse(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    reqs = _requirements()
    key = hashlib.sha256(json.dumps([reqs, sys.version_info[:2]]).encode()).hexdigest()[:12]
    cache = getattr(request.config, "cache", None)
    house = Path(cache.mkdir("device-wheels")) / key if cache is not None else tmp_path / "wheels"
    done = house / ".complete"
    if not done.exists():
        r = _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(house), *reqs])
        if r.returncode != 0:
            pytest.skip(f"cannot fill the wheelhouse from the package index (pip download failed): {r.stderr[-500:]}")
        done.touch()
    return house


@pytest.mark.timeout(900)
def test_agent_tflite_install_runs_a_bundle_without_converters(
    bundle_factory: Callable[[str, str], Path], tiny_run: Path, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    from tests.agent.tiny import release_pub_path
    from toolchain.rundir import RunDir

    bundle = bundle_factory("tflite", "int8")
    house = _wheelhouse(request, tmp_path)
    dist, src = tmp_path / "dist", tmp_path / "src"
    # built from a copy: setuptools writes build/ and *.egg-info into the source tree, and a stale egg-info in
    # the repository root would shadow the installed entry points for every later test
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", ".pytest_cache", "tests", "docs", "build",
                                                             "*.egg-info", "__pycache__", "runs", "demo_out"))
    r = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)])
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = dist.glob("edge_toolchain-*.whl")

    venv = tmp_path / "device-venv"
    r = _run([sys.executable, "-m", "venv", str(venv)])
    assert r.returncode == 0, r.stderr
    py = venv / "bin" / "python"
    r = _run([str(py), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(house),
              f"{wheel}[{','.join(EXTRAS)}]"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]

    probe = ("import importlib.util as u, json; "
             f"print(json.dumps([m for m in {list(CONVERTERS)!r} if u.find_spec(m) is not None]))")
    r = _run([str(py), "-c", probe], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [], f"converters importable on the device: {r.stdout}"

    x, y = RunDir(tiny_run).splits().test
    np.savez(tmp_path / "inputs.npz", x=x[:64])
    r = _run([str(venv / "bin" / "device-agent"), "run", "--bundle", str(bundle), "--source",
              str(tmp_path / "inputs.npz"), "--key", "x", "--device-id", "dev-venv", "--state-dir",
              str(tmp_path / "state"), "--trust-key", str(release_pub_path()), "--output", str(tmp_path / "answers.jsonl"),
              "--json"], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 64
    preds = np.array([a["prediction"] for a in answers])
    assert {a["route"] for a in answers} <= {"edge", "fallback"}
    assert (preds == y[:64]).mean() > 0.6, preds
