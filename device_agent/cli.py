"""``device-agent run``: answer every input of a source with a verified bundle.

Answers go to stdout (or ``--output``) as JSON lines; a summary table at the
end. With ``--broker`` the agent routes uncertain inputs to the cloud, sends
telemetry, a retained status, and obeys commands on ``fleet/<id>/cmd``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Iterable, Sequence

from edgecore.clikit import (
    DefaultsHelpFormatter,
    add_broker_args,
    add_common,
    add_json_flag,
    add_trust_args,
    broker_from_args,
    config_default,
    emit_json,
    login_from_args,
    run_cli,
    trust_from_args,
)
from edgecore.errors import AgentError

PASSWORD_ENV = "DEVICE_AGENT_PASSWORD"


def cmd_run(args: argparse.Namespace) -> int:

    from .agent import Agent, AgentConfig, summarize
    from .drift import DriftConfig
    from .outbox import DropPolicy
    from .sources import Item, MqttInputSource, folder_source, npz_source  # noqa: F401

    trust = trust_from_args(args)
    bundle = trust.open(args.bundle)
    user, pw = login_from_args(args, who=args.device_id, password_env=PASSWORD_ENV)
    cfg = AgentConfig(
        device_id=args.device_id, broker_url=broker_from_args(args), username=user, password=pw, prefix=args.prefix,
        deadline_s=args.deadline, telemetry_window_s=args.window, threshold=args.threshold,
        state_dir=args.state_dir, outbox_max_rows=args.outbox_max, drop_policy=DropPolicy(args.drop_policy),
        batch_size=args.batch_size, threads=args.threads, drift=DriftConfig(window=args.drift_window),
        drift_offload=args.drift_offload,
        mqtt_version=args.mqtt_version, update_bases=tuple(args.update_base or ()), trust=trust,
    )
    agent = Agent(bundle, cfg)
    spec = agent.bundle.input_spec
    src = args.source
    mqtt_src: MqttInputSource | None = None
    source: Iterable[Item]
    if src.startswith("mqtt:"):
        if not args.broker:
            raise AgentError("an MQTT source needs --broker")
        source = []  # attached once connected
    elif src.endswith(".npz"):
        source = npz_source(Path(src), spec, key=args.key)
    elif Path(src).is_dir():
        source = folder_source(Path(src), spec)
    else:
        raise AgentError(f"--source {src!r}: give a folder, a .npz file or mqtt:TOPIC")
    if src.startswith("mqtt:"):  # made before the start: subscribed before the status says online
        mqtt_src = agent.mqtt_source(src.removeprefix("mqtt:") or None)
        source = mqtt_src
    out = open(args.output, "w") if args.output else sys.stdout
    answers = []
    with agent:
        if mqtt_src is not None:
            signal.signal(signal.SIGTERM, lambda *_: mqtt_src.close())  # type: ignore[union-attr]
        else:  # SIGTERM ends the run like Ctrl-C: the open telemetry window is flushed on the way out
            signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            for a in agent.run(source):
                if mqtt_src is not None:
                    agent.publish_answer(a)
                answers.append(a)
                out.write(json.dumps(a.to_dict()) + "\n")
                out.flush()
        except KeyboardInterrupt:
            pass
    if args.output:
        out.close()
    summary = summarize(answers)
    _print_summary(summary)
    if args.json:
        emit_json(summary)
    return 0


def _print_summary(s: dict[str, object]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(s, file=sys.stderr)
        return
    t = Table(title="device-agent")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in s.items():
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console(stderr=True).print(t)


def cmd_verify(args: argparse.Namespace) -> int:
    from .agent import load_model

    trust = trust_from_args(args)
    trust.warn_if_open("device-agent verify")
    b = trust.open(args.bundle)
    load_model(b)
    signed = f", signed by key {b.signed_by}" if b.signed_by else ", UNSIGNED"
    print(f"ok: {b.name} ({b.target}/{b.precision}, manifest sha256 {b.manifest_sha256}{signed})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .agent import AgentConfig
    from .drift import DriftConfig
    from .outbox import DropPolicy

    def d(name: str) -> object:  # every default is AgentConfig's: one source
        return config_default(AgentConfig, name)

    p = argparse.ArgumentParser(prog="device-agent", description=__doc__)
    add_common(p)
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="run the agent on a source", formatter_class=DefaultsHelpFormatter)
    add_common(r)
    r.add_argument("--bundle", required=True, help="bundle dir or .tar.gz")
    r.add_argument("--source", required=True, help="folder of images/.npy, a .npz, or mqtt:TOPIC")
    r.add_argument("--key", help="array name inside the .npz")
    r.add_argument("--device-id", required=True)
    add_broker_args(r, required=False, config=AgentConfig, password_env=PASSWORD_ENV,
                    broker_help="mqtt://host:port or mqtts://host:port (omit: edge only); an unreachable broker is "
                                "joined when it appears, telemetry waits in the outbox meanwhile",
                    version_help="3.1.1 for brokers without MQTT 5 (request metadata then travels in an envelope)")
    r.add_argument("--deadline", type=float, default=d("deadline_s"), help="seconds to wait for the cloud")
    r.add_argument("--window", type=float, default=d("telemetry_window_s"), help="telemetry window, seconds")
    r.add_argument("--threshold", type=float, help="override the bundle's routing threshold")
    r.add_argument("--state-dir", type=Path, default=d("state_dir"), help="outbox and fetched bundles")
    r.add_argument("--outbox-max", type=int, default=d("outbox_max_rows"), help="telemetry windows kept")
    r.add_argument("--drop-policy", choices=[p.value for p in DropPolicy], default=d("drop_policy").value,
                   help="which window goes when the outbox is full")
    r.add_argument("--batch-size", type=int, default=d("batch_size"), help="inputs run (and offloaded) together")
    r.add_argument("--drift-window", type=int, default=config_default(DriftConfig, "window"),
                   help="inputs the drift tests look at")
    r.add_argument("--drift-offload", type=float, default=d("drift_offload"),
                   help="while drift is flagged, this share of the confident inputs goes to the cloud too (0: off)")
    r.add_argument("--threads", type=int, help="runtime threads (default: 1 for models up to 1 MiB, else the "
                   "runtime's own; 0: the runtime's own)")
    r.add_argument("--update-base", action="append", metavar="URL",
                   help="update_bundle URLs must be under this gateway URL (repeatable; none: updates by URL refused)")
    r.add_argument("--output", type=Path, help="JSON lines of answers (default stdout)")
    add_trust_args(r, who="this device")
    add_json_flag(r)
    r.set_defaults(func=cmd_run)
    v = sub.add_parser("verify", help="check a bundle's trust and that this device can run it")
    add_common(v)
    v.add_argument("bundle")
    add_trust_args(v, who="this device")
    v.set_defaults(func=cmd_verify)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
