"""``toolchain build``: turn a run's student into verified deployment bundles."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgecore.clikit import add_common, add_json_flag, emit_json, escape


def register(subparsers: Any) -> None:
    from toolchain.config import add_config_args

    p = subparsers.add_parser(
        "build", help="build + verify a deployment bundle for a target (or all)",
        description="Build the bundle (artifact, manifest, drift reference, routing curve, .tar.gz) for one "
        "target/precision, or every available one with --target all, and verify it on the test split.",
    )
    p.add_argument("--run", type=Path, default=None, help="run directory (default: run.dir of the config)")
    p.add_argument("--target", "-t", required=True, help="target name, or 'all' (see `toolchain targets`)")
    p.add_argument("--precision", "-p", default="all", help="fp32 | fp16 | int8 | all (default: every precision the target has)")
    p.add_argument("--out", "-o", type=Path, default=None,
                   help="bundle directory (with several builds: their parent); default RUN/bundles/TARGET-PRECISION")
    p.add_argument("--sign", type=Path, default=None, metavar="KEY",
                   help="sign each bundle's manifest with this Ed25519 private key (`toolchain keys new`)")
    p.add_argument("--release", type=int, default=None, metavar="N",
                   help="the bundles' release number in their model line (devices refuse a lower one than they ran; "
                   "default: the build time in seconds since 1970)")
    add_config_args(p)
    add_json_flag(p)
    add_common(p)
    p.set_defaults(func=run)


def plan(target: str, precision: str) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """(builds to do, targets skipped with why) for ``--target/--precision``."""
    from edgecore.spec import Precision
    from targets import get_target, parse_precision, target_names

    names = target_names() if target == "all" else [target]
    todo: list[tuple[str, str]] = []
    skipped: list[dict[str, str]] = []
    for name in names:
        t = get_target(name)  # unknown name: UnknownTargetError listing the known ones
        if precision == "all":
            precs = [p.value for p in t.precisions]
        elif target == "all":
            if precision not in {p.value for p in Precision}:
                parse_precision(t, precision)  # raises "unknown precision ..."
            precs = [precision] if Precision(precision) in t.precisions else []
        else:
            precs = [parse_precision(t, precision).value]
        if target == "all":
            ok, why = t.build_available()
            if not ok:
                skipped.append({"target": name, "reason": why})
                continue
        todo += [(name, p) for p in precs]
    return todo, skipped


def run(args: argparse.Namespace) -> int:
    from edgecore.errors import BuildError
    from edgecore.signing import load_private_key
    from toolchain.bundle import build_bundle, build_each
    from toolchain.config import config_from_args

    cfg = config_from_args(args)
    run_dir = args.run or args.run_dir or cfg.run.dir
    from toolchain.rundir import RunDir

    RunDir(run_dir)  # a missing or empty run folder fails before anything is built
    todo, skipped = plan(args.target, args.precision)
    single = len(todo) == 1 and args.target != "all"
    key = load_private_key(args.sign) if args.sign else None
    progress = _progress(len(todo), enabled=len(todo) > 1)  # progress_bar shows only on a terminal

    def one(target: str, precision: str) -> dict[str, Any]:
        out = args.out if single else (args.out / f"{target}-{precision}" if args.out else None)
        rep = build_bundle(run_dir=run_dir, target=target, precision=precision, out=out, cfg=cfg.build,
                           signing_key=key, release=args.release)
        progress.update(1)
        return rep

    if single:
        reports, failures = [one(*todo[0])], []
    else:
        done, failures = build_each(todo, one, on_step=lambda t, p: progress.set_description(f"{t} {p}"))
        reports = list(done.values())
    progress.close()
    summary = {"run": str(run_dir), "bundles": reports, "skipped": skipped, "failed": failures}
    _print_table(reports, skipped, failures)  # like every command: the table, then with --json the JSON line
    if args.json:
        emit_json(summary if not single else reports[0])
    if failures:
        raise BuildError(f"{len(failures)} of {len(todo)} builds failed: " + "; ".join(
            f"{f['target']} {f['precision']}: {f['error']}" for f in failures))
    return 0


class _NoProgress:
    def set_description(self, _: str) -> None: ...
    def update(self, _: int) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, *, enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    from edgecore.clikit import progress_bar

    return progress_bar(total=total, unit="bundle")


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v * 100:.2f}%" if pct else (f"{v:.3g}" if isinstance(v, float) else str(v))


def _threshold(routing: dict[str, Any]) -> str:
    rule = routing.get("rule", "accuracy")
    return f"{routing['threshold']:.3f}" + ("" if rule == "accuracy" else f" ({rule})")


def _print_table(reports: list[dict[str, Any]], skipped: list[dict[str, str]], failures: list[dict[str, str]],
                 console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from toolchain.verify import shown_accuracy, verify_label

    console = console or Console(width=160)
    table = Table(title="bundles")
    for col in ("target", "precision", "accuracy", "reference", "agreement", "max diff", "size", "build s", "threshold",
                "verify"):
        table.add_column(col)
    table.add_column("bundle", overflow="fold")  # a path is copied from here: folded over lines, never cut
    for r in reports:
        m = r["metrics"]
        acc, agree, proxy = shown_accuracy(m)
        mark = " (proxy)" if proxy else ""
        table.add_row(r["target"], r["precision"], _fmt(acc, True) + mark, _fmt(m["reference_accuracy"], True),
                      _fmt(agree, True) + mark, _fmt(m["max_abs_logit_diff"]), f"{m['size_bytes'] / 1024:.1f} KiB",
                      _fmt(m["build_seconds"]), _threshold(r["routing"]),
                      escape(verify_label(r["verify"])), r["bundle"])
    console.print(table)
    reasons = {r["target"]: r["verify"] for r in reports if r["verify"]["status"] in ("skipped", "proxy", "unverified")}
    for target, v in reasons.items():
        if v["status"] == "unverified":
            console.print(f"[yellow]{target}: accuracy is UNVERIFIED[/]: the proxy cannot look inside the artifact "
                          f"({escape(v['unverified'])}); it ran {escape(v['evaluates'])} on {escape(v['runtime'])}; "
                          f"{v['proxy_for']} not here: {escape(v['reason'])}", highlight=False)
        elif v["status"] == "proxy":
            console.print(f"[yellow]{target}: accuracy is a PROXY[/] on {escape(v['runtime'])} ({escape(v['evaluates'])}); "
                          f"{v['proxy_for']} not here: {escape(v['reason'])}", highlight=False)
        else:
            console.print(f"[yellow]verify skipped[/] for {target}: {escape(v['reason'])}", highlight=False)
    for s in skipped:
        console.print(f"[yellow]skipped[/] {s['target']}: {escape(s['reason'])}")
    for f in failures:
        console.print(f"[red]failed[/] {f['target']} {f['precision']}: {escape(f['error'])}")
