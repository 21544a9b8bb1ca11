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
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

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
from edgecore.commands import CommandTrust
from edgecore.errors import AgentError, EdgeError

PASSWORD_ENV = "DEVICE_AGENT_PASSWORD"


def cmd_run(args: argparse.Namespace) -> int:

    from .agent import Agent, AgentConfig, summarize
    from .drift import DriftConfig
    from .feed import open_inputs
    from .outbox import DropPolicy
    from .sources import Item, MqttInputSource, paced
    from .updates import open_for_device

    trust = trust_from_args(args)
    bundle = open_for_device(trust, args.bundle, args.device_id, args.state_dir)
    user, pw = login_from_args(args, who=args.device_id, password_env=PASSWORD_ENV)
    cfg = AgentConfig(
        device_id=args.device_id, broker_url=broker_from_args(args), username=user, password=pw, prefix=args.prefix,
        deadline_s=args.deadline, telemetry_window_s=args.window, threshold=args.threshold,
        state_dir=args.state_dir, outbox_max_rows=args.outbox_max, telemetry_acked_by=args.telemetry_acked_by,
        drop_policy=DropPolicy(args.drop_policy),
        batch_size=args.batch_size, threads=args.threads, drift=DriftConfig(window=args.drift_window),
        drift_offload=args.drift_offload,
        mqtt_version=args.mqtt_version, update_bases=tuple(args.update_base or ()), trust=trust,
        command_trust=CommandTrust.from_paths(args.command_key or (), allow_unsigned=args.allow_unsigned_commands),
        session_expiry_s=args.session_expiry, bench_dirs=tuple(args.bench_dir or ()),
    )
    agent = Agent(bundle, cfg)
    spec = agent.bundle.input_spec
    src = args.source
    mqtt_src: MqttInputSource | None = None
    source: Iterable[Item]
    if src is not None and src.startswith("mqtt:"):
        if not args.broker:
            raise AgentError("an MQTT source needs --broker")
        # made before the start: subscribed before the status says online
        mqtt_src = agent.fleet.mqtt_source(src.removeprefix("mqtt:") or None)
        source = mqtt_src
    else:
        source = paced(open_inputs(src, spec, run=args.run, split=args.split, key=args.key, limit=args.limit),
                       args.rate)
    out = open(args.output, "w") if args.output else sys.stdout
    answers = []
    with agent:
        if mqtt_src is not None:
            signal.signal(signal.SIGTERM, lambda *_: mqtt_src.close())
        else:  # SIGTERM ends the run like Ctrl-C: the open telemetry window is flushed on the way out
            signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            for a in agent.run(source):
                if mqtt_src is not None:
                    agent.fleet.publish_answer(a)
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


def cmd_feed(args: argparse.Namespace) -> int:
    """``device-agent feed``: publish the user's inputs to a running agent's input topic, paced; count answers."""
    from edgecore.bundle import open_bundle
    from edgecore.mqtt import MqttLink
    from edgecore.wire import Topics

    from .feed import Feeder, open_inputs

    spec = None
    if args.bundle:  # read for its input spec only: nothing in it runs here
        with open_bundle(args.bundle) as b:
            spec = b.input_spec
    items = open_inputs(args.source, spec, run=args.run, split=args.split, key=args.key, limit=args.limit)
    user, pw = login_from_args(args, who=args.device_id, password_env=PASSWORD_ENV)
    url = broker_from_args(args)
    assert url is not None  # --broker is required
    link = MqttLink(url=url, client_id=f"feed-{args.device_id}-{uuid.uuid4().hex[:6]}", username=user,
                    password=pw, mqtt_version=args.mqtt_version,
                    anonymous_hint="give the device's credentials (--credentials) or --username/--password")
    feeder = Feeder(link, Topics(args.device_id, args.prefix))
    try:
        link.start(wait=10.0)
    except EdgeError as e:
        raise AgentError(f"feed could not connect: {e}") from e
    try:
        if args.online_timeout > 0:
            feeder.wait_online(args.online_timeout)
        report = feeder.feed(items, rate=args.rate, answer_timeout=args.answer_timeout).to_dict()
    finally:
        link.stop()
    _print_summary({k: v for k, v in report.items() if v is not None})
    if args.json:
        emit_json(report)
    return 0


def _add_inputs(p: argparse.ArgumentParser, *, mqtt: bool) -> None:
    """The input flags ``run`` and ``feed`` share."""
    from .feed import RUN_SPLITS

    p.add_argument("--source", help="a folder of images or .npy files, a .npz (x [, y]), a .csv (one sample per "
                   "row, label column by header)" + (", or mqtt:[TOPIC] (default topic <prefix>/<id>/input)"
                                                     if mqtt else ""))
    p.add_argument("--run", type=Path, help="instead of --source: a run directory's --split (read by the "
                   "toolchain in its own process; needs it installed)")
    p.add_argument("--split", choices=RUN_SPLITS, default="test", help="with --run: which split")
    p.add_argument("--key", help="array name inside the .npz")
    p.add_argument("--limit", type=int, help="send at most this many inputs")
    p.add_argument("--rate", type=float, help="inputs per second (default: " + (
        "as fast as the agent answers them)" if mqtt else "as fast as the broker takes them)"))


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

    def d(name: str) -> Any:  # every default is AgentConfig's: one source
        return config_default(AgentConfig, name)

    p = argparse.ArgumentParser(prog="device-agent", description=__doc__)
    add_common(p)
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="run the agent on a source", formatter_class=DefaultsHelpFormatter)
    add_common(r)
    r.add_argument("--bundle", required=True, help="bundle dir or .tar.gz")
    _add_inputs(r, mqtt=True)
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
    r.add_argument("--telemetry-acked-by", choices=("gateway", "broker"), default=d("telemetry_acked_by"),
                   help="a window leaves the outbox when the gateway acknowledges storing it; broker: when the "
                        "broker took it (only for a gateway that does not acknowledge)")
    r.add_argument("--drop-policy", choices=[p.value for p in DropPolicy], default=d("drop_policy").value,
                   help="which window goes when the outbox is full")
    r.add_argument("--batch-size", type=int, default=d("batch_size"), help="inputs run (and offloaded) together")
    r.add_argument("--drift-window", type=int, default=config_default(DriftConfig, "window"),
                   help="inputs the drift tests look at")
    r.add_argument("--drift-offload", type=float, default=d("drift_offload"),
                   help="while drift is flagged, this share of the confident inputs goes to the cloud too (0: off)")
    r.add_argument("--threads", type=int, help="runtime threads (default: 1 for models up to 1 MiB, else the "
                   "runtime's own; 0: the runtime's own)")
    r.add_argument("--session-expiry", type=int, default=d("session_expiry_s"), metavar="S",
                   help="seconds the broker keeps this device's session while it is away: the QoS 1 inputs sent "
                        "meanwhile are queued and answered when it returns (0: a clean session, they are lost)")
    r.add_argument("--bench-dir", action="append", type=Path, metavar="DIR",
                   help="a folder (e.g. a shared mount) whose signed bundles a bench job may name by manifest sha256 "
                        "(repeatable; no other path on the device is read for a job)")
    r.add_argument("--update-base", action="append", metavar="URL",
                   help="update_bundle URLs must be under this gateway URL (repeatable; none: updates by URL refused)")
    r.add_argument("--output", type=Path, help="JSON lines of answers (default stdout)")
    add_trust_args(r, who="this device")
    r.add_argument("--command-key", action="append", type=Path, metavar="PUB",
                   help="the gateway's command key (.pub, or a folder of them): commands over MQTT run only when "
                        "signed by one, addressed to this device, unexpired and not seen before (repeatable)")
    r.add_argument("--allow-unsigned-commands", action="store_true",
                   help="DEVELOPMENT ONLY: run unsigned commands when no --command-key is given (logged loudly)")
    add_json_flag(r)
    r.set_defaults(func=cmd_run)
    f = sub.add_parser("feed", help="send a running agent inputs from a folder, .npz, .csv or a run's split, "
                       "paced, and count its answers", formatter_class=DefaultsHelpFormatter,
                       description="Publish inputs on <prefix>/<id>/input, where `device-agent run --source mqtt:` "
                       "takes them, and read the answers on <prefix>/<id>/answers: a summary of what was sent, "
                       "answered (per route) and, for labelled inputs, the accuracy.")
    add_common(f)
    f.add_argument("--device-id", required=True, help="the device to feed")
    _add_inputs(f, mqtt=False)
    f.add_argument("--bundle", help="the device's bundle: its input spec resizes images, shapes CSV rows and "
                   "checks every input before it is sent (needed for folders and CSV)")
    add_broker_args(f, required=True, config=AgentConfig, password_env=PASSWORD_ENV,
                    credentials_help="the device's {username,password} JSON or the fleet credentials.json (its "
                                     "entry for --device-id: the ACL lets it publish under its own id)",
                    version_help="3.1.1 for brokers without MQTT 5 (answers are then counted, not matched)")
    f.add_argument("--online-timeout", type=float, default=30.0,
                   help="seconds to wait for the device's status to say online (0: send at once)")
    f.add_argument("--answer-timeout", type=float, default=10.0,
                   help="seconds to wait for answers after the last input (0: do not wait)")
    add_json_flag(f)
    f.set_defaults(func=cmd_feed)
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
