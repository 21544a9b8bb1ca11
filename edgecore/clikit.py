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
import os
import sys
import warnings
from typing import Any, Callable, Sequence

from edgecore.errors import EdgeError


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


def escape(text: Any) -> str:
    """Text for rich output: messages name extras like ``edge-toolchain[tensorrt]``, which is not markup."""
    from rich.markup import escape as _escape

    return _escape(str(text))


def emit_json(report: Any) -> None:
    """Print ``report`` as one JSON line (the last line of stdout, for scripts)."""
    from edgecore.fsutil import _json_default

    sys.stdout.flush()
    print(json.dumps(report, default=_json_default), flush=True)


#: our packages: their INFO lines are progress a user wants to see
OWN_LOGGERS = ("toolchain", "targets", "calibration", "device_agent", "cloud_gateway", "hw_bench")
#: third parties whose warnings are noise on a CPU-only machine (e.g. torchao's CUDA kernels not loading)
QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "onnxscript", "onnx_ir", "nncf", "amqtt", "transitions")


def on_terminal(stream: Any = None) -> bool:
    """True when ``stream`` (default stderr) is an interactive terminal: progress bars only there."""
    s = sys.stderr if stream is None else stream
    return bool(getattr(s, "isatty", lambda: False)())


def progress_bar(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar on a terminal; disabled otherwise, so logs never fill with carriage-return frames."""
    from tqdm import tqdm  # lazy: only the commands that show progress need it

    kwargs.setdefault("disable", not on_terminal(kwargs.get("file")))
    return tqdm(iterable, **kwargs)


def setup_logging(*, debug: bool) -> None:
    """INFO for our packages, WARNING for the rest (ERROR for known-noisy ones); everything with --debug."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if debug:
        return
    # Converters' own chatter: TensorFlow/LiteRT C++ logs, libraries' deprecation notices to their authors.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GLOG_minloglevel", "2")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    args = parser.parse_args(argv)
    setup_logging(debug=bool(getattr(args, "debug", False)))
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


def add_trust_args(parser: argparse.ArgumentParser, *, who: str = "this side") -> None:
    """``--trust-key PUB`` (repeatable) and ``--allow-unsigned``: whose bundle signatures ``who`` accepts."""
    from pathlib import Path

    parser.add_argument("--trust-key", action="append", type=Path, metavar="PUB",
                        help=f"public key (.pub) or folder of them whose signatures {who} accepts (repeatable)")
    parser.add_argument("--allow-unsigned", action="store_true",
                        help="DEVELOPMENT ONLY: accept unsigned bundles when no --trust-key is given (logged loudly)")


def trust_from_args(args: argparse.Namespace) -> Any:
    """The `edgecore.bundle.TrustPolicy` the ``--trust-key``/``--allow-unsigned`` flags ask for."""
    from edgecore.bundle import TrustPolicy

    return TrustPolicy.from_paths(args.trust_key or (), allow_unsigned=args.allow_unsigned)
