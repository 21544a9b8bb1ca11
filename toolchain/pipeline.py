"""The pipeline's Python API: what the CLI commands and the demo call.

Each stage reads and writes one run directory (see `toolchain.rundir`) and
returns its report dict (also written to ``RUN/reports/<stage>.json``)::

    from toolchain.config import load_config
    from toolchain import pipeline
    cfg = load_config("toolchain.toml")
    pipeline.train(cfg, "runs/digits")
    pipeline.compress(cfg, "runs/digits")
    pipeline.export(cfg, "runs/digits")
    # or all three: pipeline.run_all(cfg, "runs/digits")
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from toolchain.config import Config


def train(cfg: Config, run_dir: Path | str | None = None, *, resume: bool = False, show: bool = True) -> dict[str, Any]:
    """Train the teacher (DDP when launched under torchrun)."""
    from toolchain.train import train as _train

    report = _train(cfg, run_dir, resume=resume)
    from toolchain import engine

    if show and engine.rank() == 0:
        from toolchain.report import print_train

        print_train(report)
    return report


def compress(cfg: Config, run_dir: Path | str | None = None, *, show: bool = True) -> dict[str, Any]:
    """Prune -> distill -> QAT the run's teacher into student.pt and student_qat.pt."""
    from toolchain.compress import compress as _compress

    return _compress(cfg, run_dir, show=show)


def export(cfg: Config, run_dir: Path | str | None = None, *, show: bool = True) -> dict[str, Any]:
    """Write and validate student.onnx, student_qdq.onnx and teacher.onnx."""
    from toolchain.export import export as _export

    return _export(cfg, run_dir, show=show)


def run_all(cfg: Config, run_dir: Path | str | None = None, *, show: bool = True) -> dict[str, Any]:
    """train + compress + export; returns {"train": ..., "compress": ..., "export": ..., "seconds": ...}."""
    t0 = time.perf_counter()
    out = {
        "train": train(cfg, run_dir, show=show),
        "compress": compress(cfg, run_dir, show=show),
        "export": export(cfg, run_dir, show=show),
    }
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out
