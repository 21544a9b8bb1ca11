"""``toolchain``: the cloud-side command line.

The CLI only parses and calls. Each subcommand is one module in
`toolchain.commands` with ``register(subparsers)``; its parser sets ``func``.
Packages above the toolchain (the demo) add commands through the
``edge_toolchain.commands`` entry-point group (``name = "package.module"``),
so the toolchain never imports them.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from importlib import metadata
from typing import Sequence

from edgecore.clikit import add_common, run_cli
from toolchain import __version__, commands

COMMANDS_GROUP = "edge_toolchain.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toolchain",
        description="Train, compress, build and verify edge deployment bundles.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_common(parser)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    for ep in sorted(metadata.entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        importlib.import_module(ep.value).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
