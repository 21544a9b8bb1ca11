"""Benchmark contenders side by side: bundles (via `Bundle.runner`) and baselines.

A *contender* is anything with a ``run(batch) -> logits``: a bundle's runner
(the same `Target.load` the device agent uses) or the PyTorch eager baseline.
Where the bundle's task has a per-frame step after the runtime (`Task.postprocess`:
a detector's decode + NMS), each query's output goes through it too, timed apart.
Contenders of one model share the same preprocessed inputs. Repetitions are
interleaved (contender order rotates each round) so the drift of a shared,
noisy machine hits every contender alike; speed-ups are medians of per-round
ratios. Torch-free: the baseline is built elsewhere and passed in.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from edgecore.bundle import Bundle
from edgecore.errors import BenchError
from edgecore.spec import InputSpec
from edgecore.tasks import Task, get_task
from targets import load_runner

from .data import TestData
from .loadgen import PostStep, RunFn, Scenario, ScenarioResult, Settings, offline, single_stream
from .ratios import paired

log = logging.getLogger(__name__)

ACCURACY_BATCH = 64


@dataclass
class Contender:
    """One thing to measure. ``meta`` goes into its result row as is; ``task`` reads its outputs (accuracy mode);
    ``post``: the task's per-frame step after the runtime call (timed apart, `loadgen.PostStep`), None where its
    task has none."""

    name: str
    model: str
    run: RunFn
    input_spec: InputSpec
    meta: dict[str, Any] = field(default_factory=dict)
    is_baseline: bool = False
    task: Task = field(default_factory=get_task)
    post: PostStep | None = None


def task_post_step(task: Task | Any) -> PostStep | None:
    """The task's per-frame step (`Task.postprocess`, named by `Task.postprocess_label`), or None; ``task``: a
    `Task` or a manifest's task block."""
    task = task if isinstance(task, Task) else get_task(task)
    return PostStep(task.postprocess_label, task.postprocess) if task.postprocess_label else None


def bundle_size_bytes(bundle: Bundle) -> int:
    """Bytes of the artifact itself (not the manifest, drift reference or plots)."""
    main = bundle.manifest.artifact.main
    files = bundle.manifest.files
    own = {n: e for n, e in files.items() if n == main or n.startswith(main.rstrip("/") + "/")}
    # companions of the main file (model.bin beside model.xml)
    stem = Path(main).stem
    for n, e in files.items():
        if Path(n).stem == stem and n not in own and not n.endswith((".json", ".png")):
            own[n] = e
    return int(sum(e.size for e in own.values()))


def bundle_contender(bundle: Bundle, *, threads: int | None) -> Contender:
    """Load the bundle's artifact through `Bundle.runner` (the agent's one way to run it)."""
    m = bundle.manifest
    runner = load_runner(bundle, threads=threads)
    model = m.model.name or "model"
    task = get_task(m.task)
    return Contender(
        name=f"{model} {bundle.target}/{bundle.precision}",
        model=model,
        run=runner.run,
        input_spec=bundle.input_spec,
        meta={
            "kind": "bundle",
            "model": model,
            "model_version": m.model.version,
            "target": bundle.target,
            "precision": bundle.precision,
            "runtime": m.artifact.runtime,
            "runtime_version": m.artifact.runtime_version,
            "bundle": str(bundle.root),
            "bundle_sha256": bundle.manifest_sha256,
            "size_bytes": bundle_size_bytes(bundle),
            "build_metrics": m.metrics,
            "threads": threads,
        },
        task=task,
        post=task_post_step(task),
    )


def not_run_entry(bundle: Bundle, why: str) -> dict[str, Any]:
    """A bundle this machine cannot run: what its build measured, a proxy figure marked as such."""
    m = bundle.manifest
    metrics, verify = m.metrics or {}, m.verify or {}
    model = m.model.name
    return {
        "artifact": f"{model} {bundle.target}/{bundle.precision}", "model": model, "target": bundle.target,
        "precision": bundle.precision, "bundle": str(bundle.root), "reason": why, "size_bytes": bundle_size_bytes(bundle),
        "build_verify": verify.get("status"), "build_accuracy": metrics.get("accuracy"),
        "proxy_accuracy": metrics.get("proxy_accuracy"), "proxy_runtime": metrics.get("proxy_runtime"),
        "reference_accuracy": metrics.get("reference_accuracy"),
    }


def split_runnable(bundles: list[Bundle]) -> tuple[list[Bundle], list[dict[str, Any]]]:
    """(bundles this machine's runtimes can run, `not_run_entry` of the others)."""
    from targets import get_target

    runnable, not_run = [], []
    for b in bundles:
        ok, why = get_target(b.target).available()
        if ok:
            runnable.append(b)
        else:
            not_run.append(not_run_entry(b, why))
    return runnable, not_run


def random_inputs(spec: InputSpec, n: int = 64, *, seed: int = 0) -> np.ndarray:
    """Normalised-looking inputs for speed runs when no test data is given."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *spec.sample_shape)).astype(spec.dtype)


def data_for(spec: InputSpec, data: "TestData | list[TestData] | None") -> TestData | None:
    """The first test set whose samples have the model's shape."""
    sets = [] if data is None else [data] if isinstance(data, TestData) else list(data)
    for d in sets:
        if tuple(d.X_raw.shape[1:]) == spec.sample_shape:
            return d
    return None


def inputs_for(spec: InputSpec, data: TestData | None) -> np.ndarray:
    """Preprocessed once, outside every timed region (random inputs without data)."""
    if data is not None and tuple(data.X_raw.shape[1:]) == spec.sample_shape:
        return np.ascontiguousarray(spec.preprocess(data.X_raw[:256]))
    return random_inputs(spec)


def accuracy(run: RunFn, spec: InputSpec, data: TestData, task: Task | None = None) -> dict[str, Any]:
    """The task's quality on ``data`` (`Task.quality` averaged: top-1 accuracy for a classifier, the images' AP at
    IoU 0.5 for a detector); batches of 64, or 1 if the artifact has a fixed batch."""
    if tuple(data.X_raw.shape[1:]) != spec.sample_shape:
        raise BenchError(
            f"test data {data.source} has samples of shape {tuple(data.X_raw.shape[1:])}, "
            f"the model takes {spec.sample_shape}"
        )
    task = task or get_task()
    X = spec.preprocess(data.X_raw)
    bs = ACCURACY_BATCH
    try:
        run(np.ascontiguousarray(X[:bs]))
    except Exception:
        bs = 1
    quality = []
    for i in range(0, X.shape[0], bs):
        out = np.asarray(run(np.ascontiguousarray(X[i : i + bs])))
        quality.append(task.quality(out, data.y[i : i + bs]))
    return {"accuracy": float(np.concatenate(quality).mean()), "n": len(data), "source": data.source}


def _merge(results: list[ScenarioResult]) -> ScenarioResult:
    first = results[0]
    posts = [r.post_ms for r in results]
    return dataclasses.replace(
        first,
        queries=sum(r.queries for r in results),
        samples=sum(r.samples for r in results),
        duration_s=sum(r.duration_s for r in results),
        latencies_ms=np.concatenate([r.latencies_ms for r in results]),
        post_ms=None if any(p is None for p in posts) else np.concatenate(posts),  # type: ignore[arg-type]
    )


def _score(r: ScenarioResult) -> float:
    """Higher is better: 1/p50 for single-stream, samples/s for offline."""
    if r.scenario is Scenario.SINGLE_STREAM:
        return 1.0 / float(np.median(r.latencies_ms))
    return r.throughput


def measure(
    contenders: list[Contender],
    *,
    settings: Settings,
    repetitions: int = 3,
    data: TestData | list[TestData] | None = None,
    do_accuracy: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure every contender, interleaved over ``repetitions`` rounds; one row each.

    Each round gives every contender 1/repetitions of the duration and query
    budget (so the totals still meet the minimums); the order rotates per round.
    Speed-up vs the model's PyTorch baseline = median over rounds of the per-round
    ratio (p50 latency for single-stream, throughput for offline).
    """
    if not contenders:
        raise BenchError("nothing to benchmark")
    reps = max(1, int(repetitions))
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise BenchError(f"two contenders share a name (the same bundle given twice?): {names}")
    cdata = {c.name: data_for(c.input_spec, data) for c in contenders}
    inputs = {c.name: inputs_for(c.input_spec, cdata[c.name]) for c in contenders}
    rounds = _run_rounds(contenders, inputs, settings=settings, reps=reps, progress=progress)
    baselines = {c.model: c for c in contenders if c.is_baseline}
    rows = []
    for c in contenders:
        merged = _merge(rounds[c.name])
        row: dict[str, Any] = {"artifact": c.name, **c.meta, "threads": settings_threads(c)}
        row.update(merged.to_dict())
        row["settings"] = settings.to_dict() | {"repetitions": reps}
        row["round_scores"] = [_score(r) for r in rounds[c.name]]  # what every ratio of this run pairs
        if "postprocess" in row:
            row["postprocess"]["share_rounds"] = [round(float(r.post_share() or 0.0), 4) for r in rounds[c.name]]
        row.update(_speedup(c, baselines.get(c.model), rounds))
        row["accuracy"] = None
        if do_accuracy and cdata[c.name] is not None:
            row["accuracy"] = accuracy(c.run, c.input_spec, cdata[c.name], c.task)
        rows.append(row)
    return rows


def _run_rounds(
    contenders: list[Contender], inputs: dict[str, np.ndarray], *, settings: Settings, reps: int,
    progress: Callable[[str], None] | None,
) -> dict[str, list[ScenarioResult]]:
    """``reps`` interleaved rounds (the order rotates), each with 1/reps of the budget; results per contender.

    Offline: the first round searches the batch size, later rounds reuse it (and its search record).
    """
    per = dataclasses.replace(
        settings,
        min_duration_s=settings.min_duration_s / reps,
        min_queries=max(1, int(np.ceil(settings.min_queries / reps))),
    )
    rounds: dict[str, list[ScenarioResult]] = {c.name: [] for c in contenders}
    fixed_batch: dict[str, int] = {}
    search: dict[str, ScenarioResult] = {}
    for r in range(reps):
        order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
        for c in order:
            if progress:
                progress(f"round {r + 1}/{reps}: {c.name}")
            if settings.scenario is Scenario.SINGLE_STREAM:
                res = single_stream(c.run, inputs[c.name], per, c.post)
            elif c.name in fixed_batch:
                res = offline(c.run, inputs[c.name], dataclasses.replace(per, batch_sizes=(fixed_batch[c.name],)), c.post)
                res.batch_search, res.batch_skipped = search[c.name].batch_search, search[c.name].batch_skipped
            else:
                res = offline(c.run, inputs[c.name], per, c.post)
                fixed_batch[c.name], search[c.name] = res.batch_size, res
            rounds[c.name].append(res)
    return rounds


def _speedup(
    c: Contender, base: Contender | None, rounds: dict[str, list[ScenarioResult]]
) -> dict[str, Any]:
    """Speed-up vs the model's baseline (`ratios.paired`: median of per-round ratios, with its range; 1.0 for a
    baseline, None without one)."""
    if base is not None and not c.is_baseline:
        ratio = paired([_score(a) for a in rounds[c.name]], [_score(b) for b in rounds[base.name]])
        per_round = [_score(a) / _score(b) for a, b in zip(rounds[c.name], rounds[base.name])]
        return {"speedup_vs_pytorch": ratio.median, "speedup_range": [ratio.lo, ratio.hi],
                "speedup_rounds": [round(x, 4) for x in per_round]}
    if c.is_baseline:
        return {"speedup_vs_pytorch": 1.0}
    return {"speedup_vs_pytorch": None}


def settings_threads(c: Contender) -> int | None:
    return c.meta.get("threads")


def open_bundles(paths: Iterable[str | Path]) -> list[Bundle]:
    from edgecore.bundle import open_bundle

    return [open_bundle(p) for p in paths]
