"""``hw-bench agent``: what the device agent costs on top of the bare runtime, per input.

The same raw inputs (a run's test split, or an .npz) go, one at a time, through

- **bare**: ``targets.load_runner(bundle).run`` on the already preprocessed
  single input (the runtime alone, what ``hw-bench run`` measures), and
- **agent**: `device_agent.agent.Agent.process` on the raw input (preprocess,
  run, confidence, route, drift, telemetry counters and histograms), edge only:
  no broker, so an uncertain input is answered as a counted fallback at once.

Rounds interleave the two (the order alternates every round) so that both see
the same load on a shared machine; ``agent_overhead`` is the ratio of the p50s.
Torch-free, device side: only the data loader of ``--run`` imports the toolchain.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgecore.errors import BenchError

from .data import TestData, from_run_dir, load_npz
from .envinfo import StealMeter, environment, load_average, steal_note

GOAL_OVERHEAD = 1.15  # through-agent p50 / bare p50
GOAL_TAIL = 3.0  # p99 / p50 of the through-agent path


def _stats(ns: np.ndarray) -> dict[str, float]:
    us = ns.astype(np.float64) / 1e3
    p50, p99 = np.percentile(us, [50, 99])
    return {"p50_us": float(p50), "p99_us": float(p99), "mean_us": float(us.mean()), "count": int(len(us)),
            "p99_over_p50": float(p99 / p50) if p50 > 0 else float("inf")}


def _timed(fn: Callable[[int], Any], n: int) -> np.ndarray:
    """Per call: wall ns (row 0) and this thread's CPU ns (row 1, blind to time spent preempted)."""
    out = np.empty((2, n), dtype=np.int64)
    wall, cpu = time.perf_counter_ns, time.thread_time_ns
    for i in range(n):
        t0, c0 = wall(), cpu()
        fn(i)
        c1, t1 = cpu(), wall()
        out[0, i], out[1, i] = t1 - t0, c1 - c0
    return out


def bench_agent(bundle_path: str | Path, data: TestData, *, rounds: int = 5, threads: int | None = None,
                warmup: int = 50, limit: int | None = None, trust: Any = None,
                threshold: float | None = None) -> dict[str, Any]:
    """Interleaved rounds of bare runtime vs. the agent's per-input path over ``data``; the result record.

    ``trust``: the `edgecore.bundle.TrustPolicy` the agent applies (default: the agent's own default).
    ``threshold``: the agent's routing threshold (default: the bundle's). Inputs below it take the uncertain
    path, which without a broker answers locally as a fallback; the record's ``uncertain_share`` says how many.
    """
    from device_agent.agent import Agent, AgentConfig, Route
    from device_agent.model import device_threads
    from device_agent.sources import Item
    from targets import load_runner

    if rounds < 1:
        raise BenchError(f"--rounds must be at least 1, got {rounds}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise BenchError(f"--threshold is a confidence in [0, 1], got {threshold}")
    from edgecore.bundle import TrustPolicy

    trust = trust if trust is not None else TrustPolicy()
    bundle = trust.open(bundle_path)
    spec = bundle.input_spec
    raw = np.asarray(data.X_raw[:limit] if limit else data.X_raw, dtype=np.float32)
    if raw.shape[1:] != tuple(spec.sample_shape):
        raise BenchError(f"test data {data.source}: samples of shape {list(raw.shape[1:])}, "
                         f"the bundle takes {list(spec.sample_shape)}")
    n = len(raw)
    pre = [spec.preprocess(raw[i : i + 1]) for i in range(n)]
    items = [Item(str(i), raw[i], int(data.y[i])) for i in range(n)]
    runtime_threads = device_threads(bundle, threads)  # the agent's choice, so both paths run alike
    runner = load_runner(bundle, threads=runtime_threads)
    with tempfile.TemporaryDirectory(prefix="hw-bench-agent-") as state:
        # a bundle without a routing threshold (hand-made ones) answers everything at the edge
        if threshold is None and (bundle.routing is None or bundle.routing.threshold is None):
            threshold = 0.0
        agent = Agent(bundle, AgentConfig(device_id="hw-bench", threads=threads, threshold=threshold,
                                          state_dir=Path(state), trust=trust))
        paths: dict[str, Callable[[int], Any]] = {
            "bare": lambda i: runner.run(pre[i]),
            "agent": lambda i: agent.process([items[i]]),
        }
        for fn in paths.values():
            _timed(lambda i, fn=fn: fn(i % n), warmup)
        load_start = load_average()
        steal = StealMeter()
        samples: dict[str, list[np.ndarray]] = {k: [] for k in paths}
        for r in range(rounds):
            for name in (("bare", "agent") if r % 2 == 0 else ("agent", "bare")):
                samples[name].append(_timed(paths[name], n))
        steal_pct = steal.share()
        answers = [(it, a) for it in items for a in agent.process([it])]
        correct = sum(a.prediction == it.label for it, a in answers)
        uncertain = sum(a.route is not Route.EDGE for _, a in answers)
    both = {name: np.concatenate(v, axis=1) for name, v in samples.items()}
    result = {name: {**_stats(v[0]), "cpu": _stats(v[1])} for name, v in both.items()}
    overhead = result["agent"]["p50_us"] / result["bare"]["p50_us"]
    overhead_cpu = result["agent"]["cpu"]["p50_us"] / result["bare"]["cpu"]["p50_us"]
    return {
        "bundle": str(bundle.root), "target": bundle.target, "precision": bundle.precision,
        "data": data.source, "inputs": n, "rounds": rounds, "threads": threads,
        "runtime_threads": runtime_threads, "threshold": agent.threshold,
        "bare": result["bare"], "agent": result["agent"],
        "agent_overhead": overhead, "agent_overhead_cpu": overhead_cpu, "agent_minus_bare_p50_us": result["agent"]["p50_us"] - result["bare"]["p50_us"],
        "agent_accuracy": correct / n, "uncertain_share": uncertain / n,
        "goal": {"agent_overhead_max": GOAL_OVERHEAD, "p99_over_p50_max": GOAL_TAIL,
                 "met": overhead <= GOAL_OVERHEAD and result["agent"]["p99_over_p50"] <= GOAL_TAIL},
        "load_avg": {"start": load_start, "end": load_average()}, "steal_pct": steal_pct,
        "env": environment(threads=threads),
    }


def print_table(rec: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"agent overhead: {rec['target']}-{rec['precision']} ({rec['inputs']} inputs × {rec['rounds']} rounds)")
    for col in ("path", "p50 µs", "p99 µs", "mean µs", "p99/p50", "CPU p50 µs", "CPU p99 µs"):
        t.add_column(col, justify="left" if col == "path" else "right")
    for name in ("bare", "agent"):
        s, c = rec[name], rec[name]["cpu"]
        t.add_row(name, f"{s['p50_us']:.1f}", f"{s['p99_us']:.1f}", f"{s['mean_us']:.1f}", f"{s['p99_over_p50']:.2f}",
                  f"{c['p50_us']:.1f}", f"{c['p99_us']:.1f}")
    con = Console()
    con.print(t)
    g = rec["goal"]
    con.print(f"agent_overhead {rec['agent_overhead']:.3f} (goal ≤ {g['agent_overhead_max']}), "
              f"on CPU time {rec['agent_overhead_cpu']:.3f}, "
              f"+{rec['agent_minus_bare_p50_us']:.1f} µs per input; goal {'met' if g['met'] else 'NOT met'}")
    con.print(f"routing threshold {rec['threshold']:.3f}: {rec['uncertain_share']:.1%} of the inputs took the "
              f"uncertain path (a local fallback here: no broker)", highlight=False)
    cpu = rec["env"]["cpu"]
    threads = str(rec["runtime_threads"] or "the runtime's own") + (" (device default)" if rec["threads"] is None else "")
    steal = rec.get("steal_pct")
    con.print(f"load average {rec['load_avg']['start']} → {rec['load_avg']['end']}"
              + ("" if steal is None else f", steal {steal:.1f}%") + f"; {cpu['model']} "
              f"({cpu['usable_cores']} usable cores); runtime threads {threads}", highlight=False)
    note = steal_note(steal)
    if note:
        con.print("warning: " + note, highlight=False)


def cmd_agent(args: argparse.Namespace) -> int:
    from edgecore.clikit import emit_json, trust_from_args

    if not args.run and not args.data:
        raise BenchError("hw-bench agent needs inputs: --run RUN_DIR (its test split) or --data NPZ")
    data = from_run_dir(args.run) if args.run else load_npz(args.data)
    rec = bench_agent(args.bundle, data, rounds=args.rounds, threads=args.threads, warmup=args.warmup,
                      limit=args.limit, trust=trust_from_args(args), threshold=args.threshold)
    print_table(rec)
    if args.json:
        emit_json(rec)
    return 0


def add_parser(sub: Any) -> None:
    """Register ``hw-bench agent`` on the CLI's subparsers."""
    from edgecore.clikit import add_common, add_json_flag, add_trust_args

    p = sub.add_parser("agent", help="the agent's per-input cost over the bare runtime (interleaved rounds)")
    add_common(p)
    p.add_argument("bundle", help="bundle directory or .tar.gz")
    p.add_argument("--run", default=None, help="run directory: its test split is the input set")
    p.add_argument("--data", default=None, help=".npz with X_raw and y (instead of --run)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the inputs (default 5)")
    p.add_argument("--warmup", type=int, default=50, help="untimed inputs per path first (default 50)")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (default: the agent's device default; 0: the runtime's own)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N inputs")
    p.add_argument("--threshold", type=float, default=None,
                   help="the agent's routing threshold (default: the bundle's); inputs below it take the "
                        "uncertain path, a local fallback here (no broker)")
    add_trust_args(p, who="the agent")
    add_json_flag(p)
    p.set_defaults(func=cmd_agent)
