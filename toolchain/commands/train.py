"""``toolchain train``: train the teacher into the run directory."""

from __future__ import annotations

import argparse
from typing import Any

from toolchain.commands._pipeline_cli import add_parser, run_stage


def register(subparsers: Any) -> None:
    p = add_parser(
        subparsers, "train", help="train the teacher (AdamW + cosine, early stopping, checkpoints, DDP under torchrun)",
        description="Train the teacher model of a run. Launch with `torchrun --nproc_per_node N -m toolchain.cli train` "
        "for data-parallel training.",
    )
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/last.pt")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from toolchain import pipeline

    return run_stage(args, pipeline.train, resume=args.resume)
