"""The tiny ``task = "detect"`` run, trained once and cached in pytest's cache dir, keyed by the sources it
depends on (as `tests.fixtures.pipeline` does for classification)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

DETECT: dict[str, dict[str, Any]] = {
    "task": {"name": "detect"},
    "run": {"seed": 0, "name": "tiny-shapes"},
    "data": {"source": "shapes", "image_size": 64, "count": 240, "batch_size": 16},
    "teacher": {"family": "resnet", "width": 8, "depth": 1, "head_convs": 1},
    "train": {"epochs": 10, "lr": 0.01, "patience": 10, "progress": False, "warmup_epochs": 0},
    "compress": {"passes": ["prune", "distill", "qat"], "control": "none"},
    "prune": {"ratio": 2.0, "steps": 1, "finetune_epochs": 1},
    "distill": {"epochs": 3, "patience": 3},
    "qat": {"epochs": 1, "freeze_observer_epoch": 1},
    "export": {"min_agreement": 0.8, "teacher": False},
}
BUDGET_PT = 3.0  # mAP points an artifact may lose (a tiny model's int8 build moves mAP by about a point)


def detect_config(run_dir: Path | str, **sections: dict[str, Any]) -> Any:
    from toolchain.config import from_dict

    raw: dict[str, dict[str, Any]] = {k: dict(v) for k, v in DETECT.items()}
    for name, table in sections.items():
        raw.setdefault(name, {}).update(table)
    raw["run"]["dir"] = str(run_dir)
    return from_dict(raw, origin="detect_config")


def _cache_key() -> str:
    import edgecore
    import toolchain

    h = hashlib.sha256(repr(sorted(DETECT.items())).encode())
    roots = [Path(toolchain.__file__).parent, Path(edgecore.__file__).parent]
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if "commands" not in path.parts:
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _build(run_dir: Path) -> Path:
    import torch

    from edgecore.fsutil import atomic_dir
    from toolchain import pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: one intra-op thread is faster than two contending
    try:
        with atomic_dir(run_dir) as tmp:
            pipeline.run_all(detect_config(tmp), tmp, show=False)
    finally:
        torch.set_num_threads(threads)
    return run_dir


@pytest.fixture(scope="module")
def det_run(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    out = tmp_path_factory.mktemp("det") / "run"
    cache = getattr(request.config, "cache", None)
    if cache is None:
        return _build(out)
    cached = Path(cache.mkdir("det_run")) / _cache_key()
    if not (cached / "reports" / "export.json").is_file():
        _build(cached)
    shutil.copytree(cached, out)
    return out


