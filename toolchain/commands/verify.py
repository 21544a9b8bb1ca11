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
    p.add_argument("--budget", type=float, default=None, help="accuracy budget in points (default: the build's)")
    add_json_flag(p)
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from toolchain.verify import verify_bundle

    report = verify_bundle(args.bundle, run_dir=args.run, budget_pt=args.budget)
    if args.json:
        emit_json(report)
    elif report["status"] == "skipped":
        print(f"{report['target']} {report['precision']}: hashes ok; verify skipped: {report['reason']}")
    else:
        print(f"{report['target']} {report['precision']}: {report['status']}  accuracy {report['accuracy'] * 100:.2f}% "
              f"(reference {report['reference_accuracy'] * 100:.2f}%), agreement {report['agreement'] * 100:.2f}%, "
              f"max |logit diff| {report['max_abs_logit_diff']:.3g}, {report['mismatch_count']} mismatches of {report['n']}")
    return 0
