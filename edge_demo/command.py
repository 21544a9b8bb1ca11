"""``toolchain demo``: the main job, end to end (see `edge_demo.story`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgecore.clikit import add_common, add_json_flag, emit_json


def register(subparsers: Any) -> None:
    from edge_demo.scenarios import SCENARIOS

    p = subparsers.add_parser(
        "demo", help="the whole story on digits (or --task detect: shapes): train, compress, build, fleet, bench, summary",
        description="Train the teacher on digits (--task detect: on generated shapes scenes), compress it (prune, "
        "distill, QAT), build bundles for every target whose tooling is installed, start a broker, the cloud gateway "
        "and three device agents (one fed a drifted stream), close the loop on the drifted one (collect, refresh, "
        "canary rollout), benchmark the bundles, and print a summary. Everything lands in --out.",
    )
    p.add_argument("--task", choices=tuple(SCENARIOS), default="classify",
                   help="classify: digits (default); detect: object detection on generated shapes scenes, the "
                   "drifted camera out of focus (blurred)")
    p.add_argument("--out", "-o", type=Path, default=Path("demo_out"), help="results folder (default: demo_out)")
    p.add_argument("--config", "-c", type=Path, default=None,
                   help="toolchain config (default, classify: ./toolchain.toml if present, else built-in defaults; "
                   "detect: the built-in shapes config, edge_demo/scenarios.py)")
    p.add_argument("--reuse", action="store_true", help="reuse a finished run in OUT/run instead of training again")
    p.add_argument("--broker", choices=("auto", "mosquitto", "amqtt"), default="auto",
                   help="local broker: Mosquitto when installed (auto), or the embedded amqtt")
    p.add_argument("--rate", type=float, default=120.0, help="inputs per second per device (default 120)")
    p.add_argument("--window", type=float, default=1.0, help="telemetry window in seconds (default 1)")
    p.add_argument("--bench-seconds", type=float, default=1.0, help="single-stream duration per artifact (default 1)")
    p.add_argument("--targets", default="", metavar="T,T",
                   help="build only these targets, e.g. onnx,openvino (default: every target; detect: onnx, openvino, tflite)")
    p.add_argument("--latency-budget-ms", type=_positive, default=None, metavar="MS",
                   help="compress to this measured onnx-fp32 latency (prune.target = \"latency\"; off by default)")
    p.add_argument("--serve", type=float, default=0.0, metavar="SECONDS",
                   help="keep the broker, gateway and dashboard up this long after the run")
    add_json_flag(p)
    add_common(p)
    p.set_defaults(func=run)


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number of milliseconds, got {text!r}") from e
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def run(args: argparse.Namespace) -> int:
    from edge_demo.story import DemoOptions, run_demo

    summary = run_demo(DemoOptions(
        out=args.out, task=args.task, config=args.config, reuse=args.reuse, broker=args.broker, rate_hz=args.rate,
        window_s=args.window, bench_seconds=args.bench_seconds, serve_s=args.serve,
        latency_budget_ms=args.latency_budget_ms,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
    ))
    if args.json:
        emit_json(summary)
    return 0
