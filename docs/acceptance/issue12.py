"""Issue 12's acceptance runs: a latency budget measured on the target runtime, and compression vs a scratch control.

    python docs/acceptance/issue12.py --out /tmp/acc12 [--seeds 0 1 2] [--sources digits mnist1d]

For each source and seed: train the default teacher (``run.seed`` = seed: split and initialisation), time the
teacher's onnx-fp32 artifact (single-stream, 2 threads, `toolchain.latency.LatencyMeter`), then compress with
``prune.target = "latency"`` and the budget = teacher p50 / ``--speedup`` (digits: 2, "half the teacher";
mnist1d: 5), distill + QAT + the scratch control as configured by default; finally build the student's
onnx-fp32 bundle and re-measure it with ``hw-bench run`` (interleaved with the teacher's). Writes
``OUT/results.json`` and prints a Markdown table; medians and spread over seeds per source.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SPEEDUP = {"digits": 2.0, "mnist1d": 5.0}
# MNIST-1D's signals are tiny (1x40): at the default width the teacher runs in ~0.16 ms, most of it ONNX Runtime's
# fixed per-call cost, and no student can be 5x faster than that floor. A wider teacher (4x the MACs) is the
# "large teacher" the issue means; the student is what the latency search leaves of it.
EXTRA = {"digits": [], "mnist1d": ["--set", "teacher.width=64"]}


def sh(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def teacher_p50(run: Path) -> float:
    """The teacher's onnx-fp32 p50, measured as the search measures (same meter, same cache file): the search's
    first candidate (the unpruned student, a copy of the teacher) then reuses this very measurement."""
    from toolchain.compress import make_context
    from toolchain.latency import LatencyMeter
    from toolchain.rundir import RunDir

    r = RunDir(run)
    ctx = make_context(r.config(), r)
    shutil.rmtree(run / "latency", ignore_errors=True)  # fresh measurements, all under this run's load
    meter = LatencyMeter(target="onnx", precision="fp32", input_spec=ctx.input_spec, labels=ctx.labels,
                         calibration=None, samples=ctx.val[0][:16].numpy(), cache_path=run / "latency" / "cache.json")
    return meter.measure(ctx.teacher, name="teacher")["p50_ms"]


def one(source: str, seed: int, out: Path) -> dict:
    run = out / f"{source}-s{seed}"
    tc = [sys.executable, "-m", "toolchain.cli"]
    sets = ["--set", f'data.source="{source}"', "--set", f"run.seed={seed}", *EXTRA[source], "--run-dir", str(run)]
    t0 = time.perf_counter()
    if not (run / "teacher.pt").exists():
        sh(*tc, "train", *sets, "--json")
    p50 = teacher_p50(run)
    budget = p50 / SPEEDUP[source]
    comp = json.loads(sh(*tc, "compress", *sets, "--set", 'prune.target="latency"',
                         "--set", f"prune.latency_budget_ms={budget:.6f}", "--json").strip().splitlines()[-1])
    sh(*tc, "export", *sets, "--json")
    bundles = out / "bundles" / f"{source}-s{seed}"
    sh(*tc, "build", *sets, "--target", "onnx", "--precision", "fp32", "--out", str(bundles / "student"), "--json")
    res = out / f"{source}-s{seed}-bench.json"
    sh(sys.executable, "-m", "hw_bench.cli", "run", str(bundles / "student"), "--scenario", "single-stream",
       "--duration", "2", "--min-queries", "500", "--threads", "2", "--repetitions", "3", "--no-accuracy",
       "--out", str(res), "--json")
    bench = json.loads(res.read_text())
    student_p50 = bench["results"][0]["latency_ms"]["p50"]
    s = comp["prune"]["latency"]
    control = comp.get("control") or {}
    return {
        "source": source, "seed": seed, "teacher_accuracy": comp["teacher_accuracy"],
        "teacher_p50_ms": p50, "budget_ms": budget, "student_accuracy": comp["student_accuracy"],
        "qat_accuracy": comp.get("qat_accuracy"), "control_accuracy": control.get("test_accuracy"),
        "gain_over_control_pt": control.get("gain_pt"),
        "loss_vs_teacher_pt": round((comp["teacher_accuracy"] - comp["student_accuracy"]) * 100, 2),
        "search_chosen_p50_ms": next(c["p50_ms"] for c in s["candidates"] if c["chosen"]),
        "student_p50_ms_hw_bench": student_p50, "meets_budget_hw_bench": student_p50 <= budget,
        "speedup_vs_teacher": p50 / student_p50, "candidates": len(s["candidates"]),
        "built_and_measured": s["built_and_measured"], "search_seconds": s["search_seconds"],
        "wall_seconds": round(time.perf_counter() - t0, 1), "load_avg": os.getloadavg(),
    }


def summarise(rows: list[dict]) -> dict:
    out = {}
    for source in sorted({r["source"] for r in rows}):
        rs = [r for r in rows if r["source"] == source]
        keys = ("teacher_accuracy", "student_accuracy", "control_accuracy", "gain_over_control_pt",
                "loss_vs_teacher_pt", "speedup_vs_teacher", "teacher_p50_ms", "student_p50_ms_hw_bench",
                "built_and_measured", "search_seconds", "wall_seconds")
        out[source] = {k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                       for k in keys if (v := [r[k] for r in rs if r.get(k) is not None])}
        out[source]["seeds"] = [r["seed"] for r in rs]
        out[source]["all_meet_budget"] = all(r["meets_budget_hw_bench"] for r in rs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sources", nargs="+", default=["digits", "mnist1d"])
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    done = a.out / "results.json"
    rows = json.loads(done.read_text())["rows"] if done.exists() else []  # a rerun continues where it stopped
    for source in a.sources:
        for seed in a.seeds:
            if any(r["source"] == source and r["seed"] == seed for r in rows):
                continue
            rows.append(one(source, seed, a.out))
            print(json.dumps(rows[-1]), flush=True)
            (a.out / "results.json").write_text(json.dumps({"rows": rows, "summary": summarise(rows)}, indent=1))
    print(json.dumps(summarise(rows), indent=1))


if __name__ == "__main__":
    main()
