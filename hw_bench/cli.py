"""``hw-bench``: benchmark bundles locally or across the fleet, and report.

    hw-bench run BUNDLE... [--scenario single-stream|offline] [--duration S] [--min-queries N]
                 [--warmup N] [--threads N] [--repetitions R] [--data NPZ] [--run RUN_DIR]
                 [--baseline [MODEL=]SOURCE] [--no-vendor-check] --out RESULTS.json [--append]
    hw-bench report RESULTS.json... --out DIR
    hw-bench fleet --broker mqtt://HOST:PORT --username U --password P --devices ID,ID
                   --bundle PATH_OR_URL [--deadline S] --out DIR
    hw-bench models --out DIR [--families mobilenet,resnet,detector] [--targets ...] [--precisions ...]
    hw-bench agent BUNDLE (--run RUN_DIR | --data NPZ) [--rounds R] [--threads N] [--json]
    hw-bench fleet-sim --teacher RUN_OR_ONNX [--devices N] [--period S] [--seconds S] [--db URL] [--json]
    hw-bench peers MODEL_OR_RUN --out DIR [--data NPZ] [--targets onnx,openvino,tflite] [--threads N]
                   [--repetitions R] [--duration S] [--json]

The CLI only parses and calls; the logic lives in importable functions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from edgecore.clikit import (
    DefaultsHelpFormatter,
    add_broker_args,
    add_common,
    add_json_flag,
    broker_from_args,
    config_default,
    emit_json,
    login_from_args,
    param_default,
    run_cli,
)

from .loadgen import Scenario, Settings


def _settings(args: argparse.Namespace) -> Settings:
    kw = dict(scenario=Scenario(args.scenario), min_duration_s=args.duration, min_queries=args.min_queries,
              warmup=args.warmup)
    if getattr(args, "batch_sizes", None):
        kw["batch_sizes"] = tuple(int(b) for b in args.batch_sizes.split(","))
    return Settings(**kw)  # type: ignore[arg-type]


def _add_scenario(p: argparse.ArgumentParser) -> None:
    def d(name: str) -> object:  # the LoadGen settings' defaults: one source (FleetJob reads them too)
        return config_default(Settings, name)

    p.add_argument("--scenario", choices=[s.value for s in Scenario], default=Scenario(d("scenario")).value)
    p.add_argument("--duration", type=float, default=d("min_duration_s"),
                   help="minimum timed seconds per artifact, in all: split over --repetitions")
    p.add_argument("--min-queries", type=int, default=d("min_queries"), help="minimum timed queries")
    p.add_argument("--warmup", type=int, default=d("warmup"), help="untimed warm-up queries")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (default: the runtime's own)")
    p.add_argument("--batch-sizes", default=None, help="offline: batch sizes to try, e.g. 1,4,16,64")


def _progress(msg: str) -> None:
    print(f"  … {msg}", file=sys.stderr, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    from .local import run_local
    from .results import write_run
    from .tables import print_rows

    run = run_local(
        bundles=args.bundles, settings=_settings(args), threads=args.threads, repetitions=args.repetitions,
        data=args.data or [], run_dirs=args.run or [], baselines=args.baseline or [],
        accuracy=not args.no_accuracy, vendor_check=not args.no_vendor_check, vendor_seconds=args.vendor_seconds,
        vendor_rounds=args.vendor_rounds,
        progress=_progress,
    )
    path = write_run(Path(args.out), run, append=args.append)
    print_rows(run)
    print(f"results: {path}")
    if args.json:
        emit_json(run)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import report

    out = report(args.results, Path(args.out))
    for k, v in out.items():
        print(f"{k}: {v}")
    return 0


def cmd_fleet(args: argparse.Namespace) -> int:
    from edgecore.signing import load_private_key

    from .fleet import FleetJob, run_fleet
    from .report import report
    from .results import write_run
    from .tables import print_rows

    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    job = FleetJob(scenario=Scenario(args.scenario), duration_s=args.duration, min_queries=args.min_queries,
                   warmup=args.warmup, threads=args.threads, accuracy=not args.no_accuracy, data=args.data)
    user, pw = login_from_args(args, who="admin")
    run = run_fleet(broker=broker_from_args(args), username=user, password=pw, devices=devices,
                    bundle=args.bundle, job=job, deadline_s=args.deadline, prefix=args.prefix,
                    mqtt_version=args.mqtt_version, progress=_progress,
                    command_key=load_private_key(args.command_key) if args.command_key else None)
    out = Path(args.out)
    path = write_run(out / "fleet_results.json", run)
    print_rows(run)
    report([path], out)
    print(f"results: {path}\nreport: {out / 'report.md'}")
    if args.json:
        emit_json(run)
    missing = [d["device_id"] for d in run["devices"] if not d.get("ok")]
    return 1 if missing and len(missing) == len(devices) else 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import build_bench_models

    out = build_bench_models(
        out_dir=Path(args.out), families=args.families.split(","), targets=args.targets.split(",") if args.targets else None,
        precisions=args.precisions.split(",") if args.precisions else None, size=args.size, progress=_progress,
    )
    for b in out["bundles"]:
        print(b)
    for s in out["skipped"]:
        print(f"skipped: {s}")
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    from edgecore.fsutil import atomic_write_json

    from .data import load_npz
    from .peers import compare_peers, markdown, resolve_input

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = resolve_input(args.model_or_run, work=out, data=load_npz(args.data) if args.data else None, size=args.size,
                        progress=_progress)
    result = compare_peers(src, out_dir=out, settings=_settings(args), repetitions=args.repetitions,
                           threads=args.threads or None, targets=args.targets.split(",") if args.targets else None,
                           progress=_progress)
    table = markdown(result)
    atomic_write_json(out / "peers.json", result)
    (out / "peers.md").write_text(table)
    print(table)
    print(f"results: {out / 'peers.json'}")
    if args.json:
        emit_json(result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hw-bench", description="LoadGen-style benchmarks of edge bundles.")
    add_common(parser)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser("run", help="benchmark bundles on this machine, side by side",
                       formatter_class=DefaultsHelpFormatter)
    add_common(p)
    p.add_argument("bundles", nargs="+", help="bundle directories or .tar.gz")
    _add_scenario(p)
    p.add_argument("--repetitions", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--data", action="append", help=".npz with X_raw and y for accuracy (repeatable)")
    p.add_argument("--run", action="append", help="run directory: test split + PyTorch baseline (repeatable)")
    p.add_argument("--baseline", action="append", help="[MODEL=]run dir | .pt | python:module:function (repeatable)")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--no-vendor-check", action="store_true", help="skip benchmark_app / trtexec")
    p.add_argument("--vendor-seconds", type=float, default=5.0, help="seconds per benchmark_app round (default 5)")
    p.add_argument("--vendor-rounds", type=int, default=3, help="alternating benchmark_app/ours rounds (default 3)")
    p.add_argument("--out", required=True, help="results JSON file")
    p.add_argument("--append", action="store_true", help="add rows to an existing results file")
    add_json_flag(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="Markdown table + PNG plots from results files")
    add_common(p)
    p.add_argument("results", nargs="+")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_report)

    from .gateway_load import register as register_gateway

    register_gateway(sub)

    from .fleet_sim import register as register_fleet_sim

    register_fleet_sim(sub)

    from .fleet import run_fleet

    p = sub.add_parser("fleet", help="run a bench job on devices over MQTT and collect one report",
                       formatter_class=DefaultsHelpFormatter)
    add_common(p)
    add_broker_args(p, required=True, credentials_help="JSON {username,password} or the fleet credentials.json "
                                                       "(its admin entry)")
    p.add_argument("--devices", required=True, help="comma-separated device ids")
    p.add_argument("--bundle", default=None, help="a bundle URL the devices fetch (under their --update-base), or a bundle here "
                   "or its manifest sha256, which devices benchmark if they hold it (default: the one they run)")
    p.add_argument("--deadline", type=float, default=param_default(run_fleet, "deadline_s"),
                   help="seconds to wait for answers")
    p.add_argument("--data", default=None, help="URL of an .npz under the devices' --update-base, for accuracy")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--command-key", type=Path, metavar="KEY",
                   help="the command key devices trust (the gateway's, --command-key of `cloud-gateway serve`): the "
                        "job is signed for each device and expires with --deadline (without it devices refuse it "
                        "unless run with --allow-unsigned-commands)")
    _add_scenario(p)
    p.add_argument("--out", required=True, help="output directory (results + report)")
    add_json_flag(p)
    p.set_defaults(func=cmd_fleet)

    from .models import bench_model_names

    p = sub.add_parser("models", help="build the benchmark models (224x224 classifiers, a 320x320 detector) for "
                                      "every available target")
    add_common(p)
    p.add_argument("--out", required=True)
    p.add_argument("--families", default=",".join(bench_model_names()),
                   help=f"classifier families and detectors, comma-separated (known: {', '.join(bench_model_names())})")
    p.add_argument("--targets", default=None, help="default: every target this machine can build and run")
    p.add_argument("--precisions", default=None, help="default: every precision of each target")
    p.add_argument("--size", type=int, default=None, help="input side (default: 224 for classifiers, 320 for detectors)")
    p.set_defaults(func=cmd_models)

    from .peers import DEFAULT_THREADS

    p = sub.add_parser("peers", help="our int8 beside each runtime's own quantizer on the same fp32 model",
                       formatter_class=DefaultsHelpFormatter)
    add_common(p)
    p.add_argument("model_or_run", metavar="MODEL_OR_RUN",
                   help="run directory, a model directory from `hw-bench models`, or a family (mobilenet, resnet)")
    p.add_argument("--out", required=True, help="output directory (peer artifacts, peers.json, peers.md)")
    p.add_argument("--data", default=None, help=".npz with X_raw and y for accuracy (a run's test split by default)")
    p.add_argument("--targets", default=None, help="runtimes to compare (default: onnx,openvino,tflite)")
    p.add_argument("--size", type=int, default=224, help="input size when MODEL_OR_RUN is a family")
    p.add_argument("--repetitions", type=int, default=5, help="interleaved rounds")
    _add_scenario(p)
    p.set_defaults(threads=DEFAULT_THREADS)
    add_json_flag(p)
    p.set_defaults(func=cmd_peers)

    from .agent_overhead import add_parser as add_agent_parser

    add_agent_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
