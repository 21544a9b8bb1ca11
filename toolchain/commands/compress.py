"""``toolchain compress``: prune, distill and QAT the teacher into the student."""

from __future__ import annotations

import argparse
from typing import Any

from toolchain.commands._pipeline_cli import add_parser, run_stage


def register(subparsers: Any) -> None:
    p = add_parser(
        subparsers, "compress", help="prune (torch-pruning) -> distill -> QAT (torchao pt2e) the teacher",
        description="Turn the run's teacher into an INT8-ready student; prints a table per stage and writes "
        "reports/compress.json.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from toolchain import pipeline

    return run_stage(args, pipeline.compress)
