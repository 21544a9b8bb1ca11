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


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` that shows every flag's default (``--x`` … ``(default: 5)``), except where there is none
    (None, False) or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or not action.option_strings or "default" in text:
            return action.help
        return f"{text} (default: %(default)s)".lstrip()


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


#: the environment variable every command reads the gateway's write token from (``--token`` wins)
TOKEN_ENV = "EDGE_GATEWAY_TOKEN"
#: the gateway's own name for it before there was one: still read, with a warning, when TOKEN_ENV is unset
OLD_TOKEN_ENV = "GATEWAY_TOKEN"
_warned_old_token = False


def gateway_token(given: str | None = None) -> str | None:
    """The gateway's write token: ``given`` (a ``--token`` flag), else ``$EDGE_GATEWAY_TOKEN``, else the old
    ``$GATEWAY_TOKEN`` (one warning per process saying to rename it); None when there is none.

    The one lookup every side uses: the gateway that checks the token and each client that sends it
    (``cloud-gateway upload|rollout|policy``, ``toolchain refresh``, hw-bench's latency device).
    """
    global _warned_old_token
    if given:
        return given
    token = os.environ.get(TOKEN_ENV)
    if token:
        return token
    old = os.environ.get(OLD_TOKEN_ENV)
    if old and not _warned_old_token:
        _warned_old_token = True
        print(f"warning: ${OLD_TOKEN_ENV} is deprecated: rename it ${TOKEN_ENV} (read for now)", file=sys.stderr)
    return old or None


def add_token_arg(parser: argparse.ArgumentParser, *, help: str = "the gateway's write token") -> None:
    """``--token``, saying where it is read from when not given."""
    parser.add_argument("--token", help=f"{help} (default: ${TOKEN_ENV})")


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


def config_default(cls: type, name: str) -> Any:
    """The default of dataclass ``cls``'s field ``name``: the one source a CLI flag's default is read from."""
    import dataclasses

    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise TypeError(f"{cls.__name__}.{name} has no default")
    raise TypeError(f"{cls.__name__} has no field {name!r}")


def param_default(fn: Callable[..., Any], name: str) -> Any:
    """The default of ``fn``'s keyword ``name``, for a flag whose only other home is that function."""
    import inspect

    d = inspect.signature(fn).parameters[name].default
    if d is inspect.Parameter.empty:
        raise TypeError(f"{fn.__name__}({name}) has no default")
    return d


def add_tls_args(parser: argparse.ArgumentParser) -> None:
    """``--ca-file``, ``--cert-file``, ``--key-file`` for a CLI that takes ``--broker``."""
    parser.add_argument("--ca-file", help="CA certificate (PEM) the mqtts:// broker's certificate is checked "
                                          "against (default: the system's CAs)")
    parser.add_argument("--cert-file", help="client certificate (PEM), for brokers that require one")
    parser.add_argument("--key-file", help="client private key (PEM) for --cert-file")


def add_broker_args(
    parser: argparse.ArgumentParser,
    *,
    required: bool,
    broker_help: str = "mqtt://host:port or mqtts://host:port",
    config: type | None = None,
    login: bool = True,
    username: str | None = None,
    password_env: str | None = None,
    credentials_help: str = "JSON {username,password} or the fleet credentials.json",
    version_help: str | None = "3.1.1 for brokers without MQTT 5",
) -> None:
    """The connection flags every CLI that talks to the broker shares, built once.

    ``--broker`` and the TLS flags; with ``login``, ``--username``, ``--password`` (or ``$password_env``) and
    ``--credentials``; ``--prefix``; and, unless ``version_help`` is None, ``--mqtt-version``. ``config``: the
    dataclass whose ``prefix`` and ``mqtt_version`` fields give those defaults (else the foundation's).
    """
    from edgecore.mqtt import DEFAULT_VERSION, VERSIONS
    from edgecore.wire import DEFAULT_PREFIX

    parser.add_argument("--broker", required=required, help=broker_help)
    add_tls_args(parser)
    if login:
        parser.add_argument("--username", default=username, help="login name on the broker")
        parser.add_argument("--password", help=f"or ${password_env}" if password_env else None)
        parser.add_argument("--credentials", type=_path, help=credentials_help)
    prefix = config_default(config, "prefix") if config is not None else DEFAULT_PREFIX
    parser.add_argument("--prefix", default=prefix, help="topics are <prefix>/<device id>/...")
    if version_help is not None:
        version = config_default(config, "mqtt_version") if config is not None else DEFAULT_VERSION
        parser.add_argument("--mqtt-version", choices=list(VERSIONS), default=version, help=version_help)


def _path(text: str) -> Any:
    from pathlib import Path

    return Path(text)


def broker_from_args(args: argparse.Namespace) -> str | None:
    """``--broker`` with the TLS flags folded into the URL (None without ``--broker``)."""
    from edgecore.mqtt import broker_url

    if not args.broker:
        return None
    return broker_url(args.broker, ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)


def read_credentials(path: Any, *, who: str) -> tuple[str, str | None]:
    """A login from a credentials file: ``{"username", "password"}`` (the username defaulting to ``who``), or
    the fleet ``credentials.json`` of ``cloud-gateway fleet-credentials``, whose ``who`` entry is read (a device
    id from ``devices``, or ``gateway``/``admin``)."""
    from pathlib import Path

    from edgecore.errors import ConfigError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable credentials file ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a credentials file (a JSON object)")
    devices = data.get("devices")
    if isinstance(devices, dict) and who in devices:  # the fleet file: a device's password
        return who, str(devices[who])
    entry = data.get(who)
    if isinstance(entry, dict):  # the fleet file's gateway or admin entry
        data = entry
    elif devices is not None:
        raise ConfigError(f"{path}: no password for {who!r} in this fleet credentials file")
    if "password" not in data:
        raise ConfigError(f"{path}: no password for {who!r} in it (expected {{\"username\", \"password\"}})")
    return str(data.get("username", who)), str(data["password"])


def login_from_args(args: argparse.Namespace, *, who: str, password_env: str | None = None
                    ) -> tuple[str | None, str | None]:
    """(username, password) from ``--credentials``, else ``--username``/``--password`` (or ``$password_env``);
    (None, None) when none is given (anonymous, for brokers that allow it; a refusal names the fix)."""
    user, pw = args.username, args.password or (os.environ.get(password_env) if password_env else None)
    if args.credentials:
        user, pw = read_credentials(args.credentials, who=who)
    if user is None and pw is None:
        return None, None
    return (user or who), pw
