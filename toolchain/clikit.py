"""What every command line of the project shares: one-line errors, ``--json``.

A CLI builds an `argparse` parser whose subcommands set ``func`` (a
``run(args) -> int``), then calls `run_cli`. An `EdgeError` becomes one line
on stderr and exit code 2; ``--debug`` shows the traceback instead.
Torch-free: the device agent, gateway and bench CLIs use it too.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable, Sequence

from toolchain.errors import EdgeError


def add_common(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: usable on the main parser and on subcommands alike, without a
    # subcommand's default overwriting a --debug given before it.
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs"
    )


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON on the last line of stdout"
    )


def emit_json(report: Any) -> None:
    """Print ``report`` as one JSON line (the last line of stdout, for scripts)."""
    from toolchain.fsutil import _json_default

    sys.stdout.flush()
    print(json.dumps(report, default=_json_default), flush=True)


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "debug", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except EdgeError as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
