"""Routing fitted on the calibration split against routing fitted on the validation split, on the test split.

    python docs/acceptance/routing_split.py --out /tmp/routing-split [--sources digits mnist1d] [--seeds 0 1 2]

For each source and seed: train the default teacher and compress it (``run.seed`` = seed; the default
``data.calibration_fraction``), then build the student's onnx-int8 bundle twice from the same run: routing
fitted on the validation split (what every stage selects its checkpoints on: *before*) and on the calibration
split (*after*). Each bundle's threshold is then applied on the test split: the cascade answers with the
student where its confidence reaches the threshold and with the teacher below it. Prints a Markdown table and
writes ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EXTRA = {"digits": [], "mnist1d": ["--set", "teacher.width=64"]}


def sh(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")


def cascade(bundle: Path, run: Path) -> dict[str, Any]:
    """The bundle's routing applied on the run's test split, the teacher answering what is offloaded."""
    import numpy as np

    from edgecore.bundle import open_bundle
    from targets import load_runner
    from toolchain.reference import _torch_logits
    from toolchain.rundir import RunDir

    b = open_bundle(bundle)
    r = RunDir(run)
    x, y = r.splits().test
    xt = b.input_spec.preprocess(x)
    runner = load_runner(b)
    edge = np.concatenate([np.asarray(runner.run(xt[i:i + 256])) for i in range(0, len(xt), 256)])
    teacher = _torch_logits(r.load_teacher(), xt)
    task, routing = r.task.contract, b.routing
    conf = task.confidence(edge, measure=routing.measure, temperature=routing.temperature)
    off = conf < routing.threshold
    edge_q, cloud_q = task.quality(edge, y), task.quality(teacher, y)
    return {"threshold": routing.threshold, "temperature": routing.temperature, "fit_split": routing.info.get("fit_split"),
            "rule": routing.info.get("rule"), "expected_offload": routing.info.get("expected_offload"),
            "test_offload": float(off.mean()), "edge_test": float(edge_q.mean()), "teacher_test": float(cloud_q.mean()),
            "cascade_test": float(np.where(off, cloud_q, edge_q).mean()), "n_test": int(len(y)),
            "gap_inputs": int(round((cloud_q.mean() - np.where(off, cloud_q, edge_q).mean()) * len(y)))}


def one(source: str, seed: int, out: Path) -> list[dict[str, Any]]:
    import toolchain.reference as reference
    from toolchain.bundle import build_bundle

    run = out / f"{source}-s{seed}"
    tc = [sys.executable, "-m", "toolchain.cli"]
    sets = ["--set", f'data.source="{source}"', "--set", f"run.seed={seed}", *EXTRA[source], "--run-dir", str(run)]
    t0 = time.perf_counter()
    if not (run / "student_qat.pt").exists():
        sh(*tc, "train", *sets)
        sh(*tc, "compress", *sets)
        sh(*tc, "export", *sets)
    rows = []
    chosen = reference._fit_split
    for label, pick in (("validation (before)", lambda s, d: ("validation", s.val)), ("calibration (after)", chosen)):
        reference._fit_split = pick
        reference._REFERENCES.clear()
        try:
            rep = build_bundle(run_dir=run, target="onnx", precision="int8", out=out / f"{source}-s{seed}-{label.split()[0]}")
        finally:
            reference._fit_split = chosen
        rows.append({"source": source, "seed": seed, "fitted_on": label, **cascade(Path(rep["bundle"]), run),
                     "seconds": round(time.perf_counter() - t0, 1), "load": round(os.getloadavg()[0], 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| source | seed | fitted on | threshold | offload (fit / test) | student test | cascade test | teacher test "
            "| cascade − teacher (inputs) |\n|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['source']} | {r['seed']} | {r['fitted_on']} | {r['threshold']:.3f} | {r['expected_offload']:.1%} / "
        f"{r['test_offload']:.1%} | {r['edge_test']:.2%} | {r['cascade_test']:.2%} | {r['teacher_test']:.2%} "
        f"| {-r['gap_inputs']:+d} of {r['n_test']} |\n" for r in rows)
    med = "\nMedians over seeds:\n\n| source | fitted on | offload (test) | cascade test | cascade − teacher (inputs) |\n|---|---|---|---|---|\n"
    for src in dict.fromkeys(r["source"] for r in rows):
        for fit in dict.fromkeys(r["fitted_on"] for r in rows):
            sel = [r for r in rows if r["source"] == src and r["fitted_on"] == fit]
            med += (f"| {src} | {fit} | {statistics.median(r['test_offload'] for r in sel):.1%} "
                    f"| {statistics.median(r['cascade_test'] for r in sel):.2%} "
                    f"| {-statistics.median(r['gap_inputs'] for r in sel):+g} |\n")
    return head + body + med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sources", nargs="+", default=["digits", "mnist1d"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = [r for s in a.sources for seed in a.seeds for r in one(s, seed, a.out)]
    (a.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
