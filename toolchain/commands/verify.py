"""``toolchain verify BUNDLE``: re-run a bundle's artifact against the PyTorch reference."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgecore.clikit import add_common, add_json_flag, emit_json


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("verify", help="re-verify a bundle on its run's test split",
                              description="Check the bundle's hashes, run its artifact on the test split of its run and "
                              "compare with the PyTorch student (accuracy gate, agreement, max logit diff).")
    p.add_argument("bundle", type=Path, help="bundle directory or .tar.gz")
    p.add_argument("--run", type=Path, default=None, help="run directory (default: the one in the manifest's lineage)")
    p.add_argument("--budget", type=_budget, default=None, help="accuracy budget in points (default: the build's)")
    add_json_flag(p)
    add_common(p)
    p.set_defaults(func=run)


def _budget(text: str) -> float:
    from toolchain.config import ACCURACY_BUDGET_RANGE, accuracy_budget_ok

    try:
        points = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number of points, got {text!r}") from e
    if not accuracy_budget_ok(points):
        raise argparse.ArgumentTypeError(f"{ACCURACY_BUDGET_RANGE}, got {text}")
    return points


def run(args: argparse.Namespace) -> int:
    from toolchain.verify import verify_bundle

    report = verify_bundle(args.bundle, run_dir=args.run, budget_pt=args.budget)
    if args.json:
        emit_json(report)
    else:
        print(describe(report))
    return 0


def _figures(r: dict[str, Any]) -> str:
    return (f"accuracy {r['accuracy'] * 100:.2f}% (reference {r['reference_accuracy'] * 100:.2f}%), agreement "
            f"{r['agreement'] * 100:.2f}%, max |logit diff| {r['max_abs_logit_diff']:.3g}, {r['mismatch_count']} mismatches "
            f"of {r['n']}")


def describe(report: dict[str, Any]) -> str:
    """One report in words; a proxy figure is always marked PROXY and names what ran it."""
    head = f"{report['target']} {report['precision']}"
    if report["status"] == "skipped":
        return f"{head}: hashes ok; verify skipped: {report['reason']}"
    if report["status"] == "unverified":
        return (f"{head}: UNVERIFIED, the proxy cannot look inside the artifact ({report['unverified']}); "
                f"{report['proxy_for']} is not here ({report['reason']})\n"
                f"  {_figures(report)}\n  ran on {report['runtime']}: {report['evaluates']}")
    if report["status"] == "proxy":
        return (f"{head}: PROXY only, {report['proxy_for']} is not here ({report['reason']})\n"
                f"  {_figures(report)}\n  ran on {report['runtime']}: {report['evaluates']}\n"
                f"  not modelled: {report['not_modelled']}")
    line = f"{head}: {report['status']} on {report.get('runtime', report['target'])}  {_figures(report)}"
    proxy = report.get("proxy")
    if proxy:
        line += f"\n  PROXY beside it ({proxy['runtime']}): accuracy {proxy['accuracy'] * 100:.2f}%"
    return line
