"""What the train/compress/export commands share: config flags, --json output."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from edgecore.clikit import add_common, add_json_flag, emit_json


def add_parser(subparsers: Any, name: str, *, help: str, description: str) -> argparse.ArgumentParser:
    from toolchain.config import add_config_args

    p = subparsers.add_parser(name, help=help, description=description)
    add_config_args(p)
    add_json_flag(p)
    add_common(p)
    return p


def run_stage(args: argparse.Namespace, stage: Callable[..., dict[str, Any]], **kwargs: Any) -> int:
    from toolchain.config import config_from_args

    cfg = config_from_args(args)
    report = stage(cfg, cfg.run.dir, **kwargs)
    if args.json:
        from toolchain import engine

        if engine.rank() == 0:
            emit_json(report)
    return 0
