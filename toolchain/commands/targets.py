"""``toolchain targets``: every registered target, and whether it builds and runs here (and why not)."""

from __future__ import annotations

import argparse
from typing import Any

from edgecore.clikit import add_common, add_json_flag, emit_json, escape


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("targets", help="list deployment targets and whether they are available here",
                              description="List every registered target with its precisions, whether this machine can "
                              "build and run its artifacts, and why not.")
    add_json_flag(p)
    add_common(p)
    p.set_defaults(func=run)


def survey() -> list[dict[str, Any]]:
    from targets import get_target, target_names

    rows = []
    for name in target_names():
        t = get_target(name)
        run_ok, run_why = t.available()
        build_ok, build_why = t.build_available()
        rows.append({"name": name, "description": t.description, "precisions": [p.value for p in t.precisions],
                     "runtime": t.runtime, "available": run_ok, "reason": run_why, "buildable": build_ok,
                     "build_reason": build_why})
    return rows


def run(args: argparse.Namespace) -> int:
    rows = survey()
    if args.json:
        emit_json(rows)
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="deployment targets")
    for col in ("target", "precisions", "builds here", "runs here", "why / runtime"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], ", ".join(r["precisions"]), "[green]yes[/]" if r["buildable"] else "[red]no[/]",
                  "[green]yes[/]" if r["available"] else "[red]no[/]",
                  escape(r["reason"]))
    Console(width=160).print(t)
    return 0
