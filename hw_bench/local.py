"""A local benchmark run: bundles + baselines + vendor cross-checks -> one run dict.

Cloud side or device side: the PyTorch baseline is imported only when asked for.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from edgecore.bundle import Bundle
from edgecore.errors import BenchError
from edgecore.spec import InputSpec

from .bench import Contender, bundle_contender, measure, open_bundles, split_runnable
from .data import TestData, from_run_dir, load_npz
from .envinfo import StealMeter, environment, int8_hint, steal_note
from .loadgen import Scenario, Settings
from .results import new_run

log = logging.getLogger(__name__)


def run_local(
    *,
    bundles: list[str | Path],
    settings: Settings,
    threads: int | None = None,
    repetitions: int = 3,
    data: list[str | Path] = (),  # type: ignore[assignment]
    run_dirs: list[str | Path] = (),  # type: ignore[assignment]
    baselines: list[str] = (),  # type: ignore[assignment]
    accuracy: bool = True,
    vendor_check: bool = True,
    vendor_seconds: float = 5.0,
    vendor_rounds: int = 3,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark ``bundles`` side by side with their PyTorch baselines.

    ``run_dirs`` give test data (their test split) and a baseline (their fp32
    student) for the model they trained; ``baselines`` add ``[MODEL=]SOURCE``
    baselines (see `hw_bench.baseline`); ``data`` adds .npz test sets.
    """
    opened, not_run = split_runnable(open_bundles(bundles))
    if not opened:
        if not not_run:
            raise BenchError("no bundles to benchmark")
        raise BenchError("no bundle here can run: " + "; ".join(f"{n['artifact']}: {n['reason']}" for n in not_run))
    contenders: list[Contender] = [bundle_contender(b, threads=threads) for b in opened]
    tests: list[TestData] = [load_npz(d) for d in data]
    specs = list(baselines)
    for rd in run_dirs:
        tests.append(from_run_dir(rd))
        specs.append(str(rd))
    if specs:
        base = _baseline_contenders(specs, {c.model: c.input_spec for c in contenders}, threads)
        bundled = {c.model: c for c in contenders}
        for b in base:  # the same model's raw output: its bundles' task and per-frame step (a detector's decode)
            if b.model in bundled:
                b.task, b.post = bundled[b.model].task, bundled[b.model].post
        contenders = base + contenders
    steal = StealMeter()
    rows = measure(contenders, settings=settings, repetitions=repetitions, data=tests, do_accuracy=accuracy,
                   progress=progress)
    steal_pct = steal.share()
    checks: list[dict[str, Any]] = []
    notes: list[str] = []
    if vendor_check:
        n = len(opened)
        checks, notes = _vendor_checks(
            opened, rows[len(contenders) - n:], contenders[len(contenders) - n:], tests, settings=settings,
            threads=threads, seconds=vendor_seconds, rounds=vendor_rounds, progress=progress,
        )
    notes.append(harness_overhead_note())
    env = {**environment(threads=threads), "steal_pct": steal_pct}
    notes.append("int8 on this CPU: " + int8_hint(env["cpu"]))
    note = steal_note(steal_pct)
    if note:
        notes.append(note)
    return new_run(env=env, rows=rows, cross_checks=checks, notes=notes, not_run=not_run)


def _baseline_contenders(specs: list[str], models: dict[str, InputSpec], threads: int | None) -> list[Contender]:
    """The PyTorch baselines of ``specs``, at most one per model."""
    from .baseline import torch_contender

    base = [torch_contender(s, models=models, threads=threads) for s in specs]
    seen = set()
    for b in base:
        if b.model in seen:
            raise BenchError(f"two baselines for model {b.model!r}")
        seen.add(b.model)
    return base


def _vendor_checks(
    opened: list[Bundle], rows: list[dict[str, Any]], bundle_contenders: list[Contender], tests: list[TestData], *,
    settings: Settings, threads: int | None, seconds: float, rounds: int, progress: Callable[[str], None] | None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """(cross-checks against the vendors' tools, notes): benchmark_app for openvino, trtexec for jetson."""
    from .bench import data_for, inputs_for
    from .vendor import cross_check_openvino, trtexec_status

    checks: list[dict[str, Any]] = []
    notes: list[str] = []
    for b, row, c in zip(opened, rows, bundle_contenders):
        if b.target == "openvino":
            if settings.scenario is not Scenario.SINGLE_STREAM:
                notes.append(f"{row['artifact']}: benchmark_app cross-check runs with single-stream only")
                continue
            if progress:
                progress(f"benchmark_app: {row['artifact']}")
            samples = inputs_for(c.input_spec, data_for(c.input_spec, tests))
            checks.append({"artifact": row["artifact"],
                           **cross_check_openvino(b, c.run, samples, threads=threads, seconds=seconds, rounds=rounds)})
        elif b.target == "jetson":
            checks.append({"artifact": row["artifact"], **trtexec_status()})
    if not any(b.target == "jetson" for b in opened):
        t = trtexec_status()
        notes.append("trtexec: " + (f"present at {t['path']} (no jetson bundle given)" if t["available"] else t["reason"]))
    return checks, notes


def harness_overhead_note() -> str:
    """What the timing loop itself costs per query (a no-op model), so no one wonders."""
    import numpy as np

    from .loadgen import single_stream

    r = single_stream(lambda b: b, np.zeros((4, 1), np.float32), Settings(min_duration_s=0.05, min_queries=1000, warmup=10))
    return f"harness overhead per query (no-op model): p50 {r.percentiles()['p50'] * 1000:.2f} µs"
