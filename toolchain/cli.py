"""``toolchain``: the cloud-side command line.

The CLI only parses and calls. Each subcommand is one module in
`toolchain.commands` with ``register(subparsers)``; its parser sets ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from typing import Sequence

from toolchain import __version__, commands
from toolchain.clikit import add_common, run_cli


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
