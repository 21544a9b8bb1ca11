"""What the default training and compression cost per 1,000 training samples, at common input sizes.

    python docs/acceptance/training_cost.py [--out /tmp/training-cost] [--sets digits rgb32 mnist1d shapes96]

For each data set: the default teacher trained for 2 epochs, then each default compression pass run with its
epochs cut to a few, one PyTorch thread, the CPU time of each stage measured with ``time.process_time`` (CPU
seconds are what a busy, shared machine does not change much; wall time on an idle machine with two threads is
about 0.6 times the figure). Each stage's CPU seconds per epoch per 1,000 training samples, times the default
number of epochs, gives the default's cost per 1,000 samples (an upper bound: early stopping may end a stage
sooner). Prints a Markdown table and writes ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

SETS: dict[str, dict[str, Any]] = {
    "digits": {"data": {"source": "digits"}},  # 8x8 grayscale
    "rgb32": {"data": {"source": "python:training_cost:rgb32"}},  # 32x32 RGB, a tinted-image-folder-sized set
    "mnist1d": {"data": {"source": "mnist1d"}},  # 1 x 40 signals
    "shapes96": {"task": {"name": "detect"}, "data": {"source": "shapes", "image_size": 96, "count": 600}},
}
SHORT = {"train": {"epochs": 2, "patience": 2, "progress": False},
         "prune": {"steps": 1, "finetune_epochs": 1}, "distill": {"epochs": 2, "patience": 2},
         "qat": {"epochs": 2, "freeze_observer_epoch": 1}, "compress": {"control": "none"},
         "student": {"compare": False}}


def rgb32(n: int = 1800, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 32x32 RGB image set of ten classes (a tinted gradient per class, noise): the size of a small folder."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    base = np.stack([np.sin(3 * xx + c) * np.cos(2 * yy - c) for c in range(10)])
    tint = rng.uniform(0.2, 1.0, (10, 3))
    x = (base[y][:, None] * tint[y][:, :, None, None] + 0.3 * rng.standard_normal((n, 3, 32, 32))) * 127 + 128
    return np.clip(x, 0, 255).astype(np.float32), y


def _cfg(name: str, run_dir: Path, short: bool) -> Any:
    from toolchain.config import from_dict

    raw: dict[str, dict[str, Any]] = {k: dict(v) for k, v in SETS[name].items()}
    if short:
        for k, v in SHORT.items():
            raw.setdefault(k, {}).update(v)
    raw.setdefault("run", {})["dir"] = str(run_dir)
    return from_dict(raw, origin="training_cost")


def one(name: str, out: Path) -> dict[str, Any]:
    import torch

    from toolchain.compress import make_context, make_student
    from toolchain.passes import get_pass
    from toolchain.rundir import RunDir
    from toolchain.train import train

    torch.set_num_threads(1)
    run_dir = out / name
    cfg, defaults = _cfg(name, run_dir, True), _cfg(name, run_dir, False)
    t0 = time.process_time()
    rep = train(cfg, run_dir)
    n_train = rep["data"]["splits"]["train"]
    stages = [{"stage": "teacher (train)", "cpu_s": time.process_time() - t0, "epochs": rep["epochs_run"],
               "default_epochs": defaults.train.epochs}]
    ctx = make_context(cfg, RunDir(run_dir))
    student = make_student(cfg, ctx)
    for pname in cfg.compress.passes:
        p = get_pass(pname)(cfg)
        t0 = time.process_time()
        res, _ = p.run(student, ctx)
        cpu = time.process_time() - t0
        if not p.quantizes:
            student = res.model
        short_cfg, full_cfg = getattr(cfg, pname), getattr(defaults, pname)
        if pname == "prune":
            epochs, default_epochs = short_cfg.steps * short_cfg.finetune_epochs, full_cfg.steps * full_cfg.finetune_epochs
        else:
            epochs = int(res.summary.get("epochs_run") or res.summary.get("epochs") or short_cfg.epochs)
            default_epochs = full_cfg.epochs
            if pname == "qat":
                from toolchain.passes.qat import qat_epochs

                default_epochs = qat_epochs(full_cfg, n_train, defaults.data.batch_size)[0]
        stages.append({"stage": pname, "cpu_s": cpu, "epochs": epochs, "default_epochs": default_epochs})
    for s in stages:
        s["cpu_s_per_epoch_per_1000"] = s["cpu_s"] / max(1, s["epochs"]) * 1000 / n_train
        s["default_cpu_s_per_1000"] = s["cpu_s_per_epoch_per_1000"] * s["default_epochs"]
    return {"set": name, "n_train": n_train, "input_shape": list(ctx.input_shape), "stages": stages,
            "default_cpu_s_per_1000": sum(s["default_cpu_s_per_1000"] for s in stages)}


def main() -> None:
    import sys

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/training-cost"))
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).parent))  # the rgb32 factory (python:training_cost:rgb32)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    rows = [one(s, a.out) for s in a.sets]
    meta = {"cpu": cpu, "load_avg": os.getloadavg(), "torch_threads": 1}
    (a.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"CPU: {cpu}; load average {meta['load_avg'][0]:.1f}; one PyTorch thread; CPU seconds\n")
    print("| data (input) | stage | CPU s / epoch / 1,000 samples | default epochs | default CPU s / 1,000 samples |")
    print("|---|---|---|---|---|")
    for r in rows:
        for s in r["stages"]:
            print(f"| {r['set']} {r['input_shape']} | {s['stage']} | {s['cpu_s_per_epoch_per_1000']:.1f} | "
                  f"{s['default_epochs']} | {s['default_cpu_s_per_1000']:.0f} |")
        print(f"| {r['set']} | **all stages** | | | **{r['default_cpu_s_per_1000']:.0f}** |")


if __name__ == "__main__":
    main()
