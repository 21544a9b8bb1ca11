"""``cloud-gateway``: ``serve`` a replica, or generate ``fleet-credentials``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Sequence

from edgecore.clikit import (
    TOKEN_ENV,
    DefaultsHelpFormatter,
    add_broker_args,
    add_common,
    add_json_flag,
    add_token_arg,
    add_trust_args,
    broker_from_args,
    config_default,
    emit_json,
    gateway_token,
    login_from_args,
    run_cli,
    trust_from_args,
)
from edgecore.errors import GatewayError

from .config import DEFAULT_PROMOTE_IF

log = logging.getLogger("cloud_gateway")


PASSWORD_ENV = "GATEWAY_MQTT_PASSWORD"


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import CollectionPolicy, GatewayConfig, WorkerConfig
    from .service import Gateway

    user, pw = login_from_args(args, who="gateway", password_env=PASSWORD_ENV)
    if args.batch_size < 1 or args.batch_ms < 0:
        raise GatewayError("--batch-size must be >= 1 and --batch-ms >= 0")
    if args.ingest_queue < 1 or args.telemetry_retention_days < 0:
        raise GatewayError("--ingest-queue must be >= 1 and --telemetry-retention-days >= 0")
    cfg = GatewayConfig(
        worker=WorkerConfig(broker_url=broker_from_args(args), username=user, password=pw, prefix=args.prefix,
                            replica_id=args.replica_id, batch_size=args.batch_size, batch_ms=args.batch_ms,
                            max_payload_bytes=args.max_payload, mqtt_version=args.mqtt_version,
                            max_pending_per_device=args.max_pending_per_device, ingest_group=args.ingest_group,
                            ingest_queue=args.ingest_queue, telemetry_retention_days=args.telemetry_retention_days),
        metrics_per_device=args.metrics_per_device,
        teacher=args.teacher, db=args.db, bundles_dir=args.bundles_dir, http_host=args.http_host,
        http_port=None if args.http_port < 0 else args.http_port,
        token=gateway_token(args.token), threads=args.threads,
        teacher_format=args.teacher_format, trust=trust_from_args(args),
        command_key=args.command_key, command_ttl_s=args.command_ttl,
        collect=CollectionPolicy.parse(args.collect, rate=args.collect_rate, max_per_device=args.collect_max_per_device,
                                       max_total=args.collect_max_total, retention_days=args.collect_retention_days),
    )
    gw = Gateway(cfg).start()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"gateway {args.replica_id} serving teacher {gw.teacher.name} ({gw.teacher.version})"
          + (f", API on {gw.http_url}" if cfg.http_port is not None else ""), flush=True)
    done.wait()
    gw.stop()
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    """``cloud-gateway samples list|stats|delete``: the collected samples in the store, straight from the database."""
    from .store import GatewayStore

    store = GatewayStore(args.db)
    if args.action == "delete":
        if not args.device:
            raise GatewayError("samples delete needs --device ID (samples are deleted per device)")
        report: dict[str, object] = {"device": args.device, "deleted": store.samples.delete(args.device)}
        print(f"deleted {report['deleted']} samples of device {args.device}")
    elif args.action == "stats":
        report = {"devices": store.samples.stats()}
        _print_rows(report["devices"], ("device", "samples", "labelled", "oldest", "newest"))  # type: ignore[arg-type]
    else:
        rows = store.samples.rows(limit=args.limit, device=args.device)
        report = {"samples": [{k: v for k, v in r.items() if k not in ("input", "teacher_probs")} for r in rows]}
        _print_rows(report["samples"], ("id", "device_id", "bundle", "teacher_label", "uncertainty", "confidence",  # type: ignore[arg-type]
                                        "drift", "flagged", "human_label"))
    if args.json:
        emit_json(report)
    return 0


def _print_rows(rows: list[dict[str, object]], cols: tuple[str, ...]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table()
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*[f"{r.get(c):.3f}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols])
    Console().print(t)


def _http(method: str, url: str, *, token: str | None, body: dict[str, object] | None = None) -> object:
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method, headers=headers),
                                    timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read()).get("error")
        except ValueError:
            msg = e.reason
        hint = f" (give the gateway's token: --token or ${TOKEN_ENV})" if e.code in (401, 403) and not token else ""
        raise GatewayError(f"gateway answered {e.code}: {msg}{hint}") from e
    except (urllib.error.URLError, OSError) as e:
        raise GatewayError(f"cannot reach the gateway at {url}: {getattr(e, 'reason', e)}") from e


def bundle_name(path: Path) -> str:
    """The name a bundle is stored under at the gateway: the file name without ``.tar.gz``."""
    return path.name.removesuffix(".tar.gz").removesuffix(".tgz")


def upload_bundle(base: str, path: Path, *, token: str | None, name: str | None = None) -> dict[str, object]:
    """PUT a bundle ``.tar.gz`` to the gateway at ``base`` (it verifies it: signed by a key it trusts);
    the gateway's answer: ``name``, ``sha256``, ``manifest_sha256``, ``url``."""
    path = Path(path)
    if path.is_dir():
        raise GatewayError(f"{path} is a bundle folder: upload its .tar.gz (`toolchain build` writes both)")
    if not path.is_file():
        raise GatewayError(f"{path}: no such bundle archive")
    if not token:
        raise GatewayError(f"uploading a bundle needs the gateway's write token: --token or ${TOKEN_ENV}")
    import urllib.error
    import urllib.request

    name = name or bundle_name(path)
    req = urllib.request.Request(f"{base.rstrip('/')}/api/bundles/{name}", data=path.read_bytes(), method="PUT",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/gzip"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read()).get("error")
        except ValueError:
            msg = e.reason
        raise GatewayError(f"uploading {path} to {base}: the gateway answered {e.code}: {msg}") from e
    except (urllib.error.URLError, OSError) as e:
        raise GatewayError(f"uploading {path}: cannot reach the gateway at {base} "
                           f"({getattr(e, 'reason', e)})") from e


def cmd_upload(args: argparse.Namespace) -> int:
    """``cloud-gateway upload BUNDLE.tar.gz``: store a bundle at the running gateway (verified there)."""
    out = upload_bundle(args.gateway, Path(args.bundle), token=gateway_token(args.token), name=args.name)
    print(f"uploaded {args.bundle} as {out['name']} (sha256 {str(out['sha256'])[:12]}): {out['url']}")
    if args.json:
        emit_json(out)
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    """``cloud-gateway rollout start|status|list|abort|approve``: through the running gateway's HTTP API (it drives
    them)."""
    import time

    base, token = args.gateway.rstrip("/"), gateway_token(args.token)
    if args.action == "start":
        if not args.bundle:
            raise GatewayError("rollout start needs BUNDLE (a name in the gateway's store, or a .tar.gz to upload)")
        name = args.bundle
        path = Path(args.bundle)
        if path.is_file():  # upload it first: the gateway verifies it (signed by a trusted key) before storing
            name = upload_bundle(base, path, token=token)["name"]  # type: ignore[assignment]
        body = {"bundle": name, "canary": args.canary, "watch_s": args.watch, "promote_if": args.promote_if}
        if args.line:
            body["line"] = args.line
        if args.canary_seed is not None:
            body["canary_seed"] = args.canary_seed
        if args.min_reports is not None:
            body["min_reports"] = args.min_reports
        out = _http("POST", f"{base}/api/rollouts", token=token, body=body)
        rid = out["id"]  # type: ignore[index]
        print(f"rollout {rid} started: {name} to canaries {args.canary}, watching {args.watch:g} s")
        if args.wait:
            while True:
                r = _http("GET", f"{base}/api/rollouts/{rid}", token=token)
                if r["state"] not in ("updating", "watching", "promoting", "rolling_back"):  # type: ignore[index]
                    break  # (awaiting_approval too: a person decides)
                time.sleep(1)
            out = r
    elif args.action == "abort":
        out = _http("POST", f"{base}/api/rollouts/{args.id}/abort", token=token)
    elif args.action == "approve":
        out = _http("POST", f"{base}/api/rollouts/{args.id}/approve", token=token)
    elif args.action == "status" and args.id is not None:
        out = _http("GET", f"{base}/api/rollouts/{args.id}", token=token)
    else:
        out = _http("GET", f"{base}/api/rollouts", token=token)
    _print_rollout(out)
    if args.json:
        emit_json(out)
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    """``cloud-gateway policy show|set FILE|approve --id N``: through the running gateway's HTTP API."""
    base, token = args.gateway.rstrip("/"), gateway_token(args.token)
    if args.action == "set":
        if not args.file:
            raise GatewayError("policy set needs FILE (a JSON policy; docs/gateway.md, 'Refresh policy')")
        try:
            doc = json.loads(Path(args.file).read_text())
        except (OSError, ValueError) as e:
            raise GatewayError(f"{args.file}: not a readable JSON policy ({e})") from e
        out = _http("PUT", f"{base}/api/policy", token=token, body=doc)
    elif args.action == "approve":
        if args.id is None:
            raise GatewayError("policy approve needs --id (see `policy show`)")
        out = _http("POST", f"{base}/api/policy/proposals/{args.id}/approve", token=token)
    else:
        out = _http("GET", f"{base}/api/policy", token=token)
        for p in out.get("proposals", []):  # type: ignore[union-attr]
            why = "; ".join(f["why"] for f in p["reason"]["fired"])
            print(f"proposal {p['id']} [{p['state']}]: {why}")
    if args.json:
        emit_json(out)
    return 0


def _print_rollout(out: object) -> None:
    rows = out if isinstance(out, list) else [out]
    for r in rows:
        if not isinstance(r, dict) or "state" not in r:
            continue
        plan = r.get("plan") or {}
        excluded = plan.get("excluded_count") or {}
        print(f"rollout {r['id']}: {r['bundle']} (model line {plan.get('line', '?')}) -> {r['state']}"
              + (f"; left out: {', '.join(f'{n} ({why})' for why, n in excluded.items())}" if excluded else ""))
        for s in r.get("steps", []):
            print(f"  {time.strftime('%H:%M:%S', time.localtime(s['time']))}  {s['step']}")


def cmd_credentials(args: argparse.Namespace) -> int:
    from .credentials import make_fleet, write_fleet_files

    ids = list(args.devices)
    if args.devices_file:
        ids += [ln.strip() for ln in Path(args.devices_file).read_text().splitlines() if ln.strip()]
    if not ids:
        raise GatewayError("name at least one device id (positional, or --devices-file)")
    creds = make_fleet(device_ids=ids, gateway_user=args.gateway_user, admin_user=args.admin_user)
    paths = write_fleet_files(creds, args.out, prefix=args.prefix)
    report = {"devices": len(ids), **{k: str(v) for k, v in paths.items()}}
    print(f"wrote {paths['passwd']} (mosquitto password_file), {paths['acl']} (acl_file) and "
          f"{paths['credentials']} (secrets, keep private) for {len(ids)} devices")
    if args.json:
        emit_json(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import CollectionPolicy, GatewayConfig, WorkerConfig

    def g(name: str) -> object:  # every serve default is its dataclass's: one source
        return config_default(GatewayConfig, name)

    def w(name: str) -> object:
        return config_default(WorkerConfig, name)

    def c(name: str) -> object:
        return config_default(CollectionPolicy, name)

    p = argparse.ArgumentParser(prog="cloud-gateway", description=__doc__)
    add_common(p)
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("serve", help="run one gateway replica (MQTT worker + HTTP API)",
                       formatter_class=DefaultsHelpFormatter)
    add_common(s)
    add_broker_args(s, required=True, config=WorkerConfig, username="gateway", password_env=PASSWORD_ENV,
                    credentials_help="credentials.json from fleet-credentials (its gateway entry)",
                    version_help="3.1.1 for brokers without MQTT 5 (then no shared subscription: run one replica)")
    s.add_argument("--teacher", required=True, type=Path, help="run dir (teacher.onnx/teacher.pt) or .onnx file")
    s.add_argument("--teacher-format", choices=["onnx", "torch"], default=g("teacher_format"),
                   help="for a run dir: serve teacher.onnx (onnxruntime) or teacher.pt (PyTorch)")
    s.add_argument("--replica-id", default=w("replica_id"), help="this replica's name (client ids, metrics)")
    s.add_argument("--batch-size", type=int, default=w("batch_size"),
                   help="most requests per model call (a burst already on the socket is served as one batch)")
    s.add_argument("--batch-ms", type=float, default=w("batch_ms"),
                   help="while a batch runs, the batcher waits up to this for more, only while more keeps arriving")
    s.add_argument("--max-payload", type=int, default=w("max_payload_bytes"), help="bytes")
    s.add_argument("--ingest-group", default=w("ingest_group"), metavar="GROUP",
                   help="replicas split telemetry and statuses as $share/GROUP/... ('': every replica gets all)")
    s.add_argument("--ingest-queue", type=int, default=w("ingest_queue"), metavar="N",
                   help="windows waiting to be stored; past it the MQTT thread waits (back-pressure, counted)")
    s.add_argument("--telemetry-retention-days", type=float, default=w("telemetry_retention_days"), metavar="D",
                   help="raw telemetry windows older than this are deleted (0: kept forever)")
    s.add_argument("--metrics-per-device", action="store_true",
                   help="/metrics: a series per device (default: summed per model line)")
    s.add_argument("--max-pending-per-device", type=int, default=w("max_pending_per_device"), metavar="N",
                   help="requests one device may have waiting for the teacher; past it its own are refused")
    s.add_argument("--db", default=g("db"), help="SQLite path or database URL (postgresql://user:pw@host/db); "
                   "upgraded in place on open")
    s.add_argument("--bundles-dir", type=Path, default=g("bundles_dir"), help="where uploaded bundles are kept")
    s.add_argument("--http-host", default=g("http_host"), help="address the HTTP API listens on")
    s.add_argument("--http-port", type=int, default=g("http_port"), help="-1: no HTTP API")
    add_token_arg(s, help="token for the write endpoints (none: they are disabled)")
    s.add_argument("--threads", type=int)
    add_trust_args(s, who="the bundle upload")
    s.add_argument("--command-key", type=Path, metavar="KEY",
                   help="the gateway's command key (Ed25519 .key, `toolchain keys new`): every command to a device is "
                        "signed with it and expires; devices trust its .pub (device-agent run --command-key)")
    s.add_argument("--command-ttl", type=float, default=g("command_ttl_s"), metavar="S",
                   help="seconds a command stays valid (a rollout's at least its update timeout)")
    s.add_argument("--collect", metavar="all|DEV[,DEV]", help="collect offloaded inputs with the teacher's answer "
                   "from these devices (off by default; docs/gateway.md, 'Collected samples')")
    s.add_argument("--collect-rate", type=float, default=c("rate"), help="share of offloads collected (flagged: always)")
    s.add_argument("--collect-max-per-device", type=int, default=c("max_per_device"), help="samples kept per device")
    s.add_argument("--collect-max-total", type=int, default=c("max_total"), help="samples kept in all")
    s.add_argument("--collect-retention-days", type=float, default=c("retention_days"),
                   help="0: until the bounds push them out")
    s.set_defaults(func=cmd_serve)
    sm = sub.add_parser("samples", help="collected samples in the store: list, stats, delete --device D")
    add_common(sm)
    sm.add_argument("action", choices=("list", "stats", "delete"))
    sm.add_argument("--db", default=g("db"), help="SQLite path or database URL")
    sm.add_argument("--device", help="only this device (required for delete)")
    sm.add_argument("--limit", type=int, default=50)
    add_json_flag(sm)
    sm.set_defaults(func=cmd_samples)
    ro = sub.add_parser("rollout", help="staged rollout through the running gateway: start, status, list, abort, "
                        "approve (a rollout the gateway had no evidence to promote on its own)",
                        formatter_class=DefaultsHelpFormatter)
    add_common(ro)
    ro.add_argument("action", choices=("start", "status", "list", "abort", "approve"))
    ro.add_argument("bundle", nargs="?", help="start: a bundle name in the gateway's store, or a .tar.gz to upload")
    ro.add_argument("--id", type=int, help="status/abort/approve: the rollout id")
    ro.add_argument("--gateway", default="http://127.0.0.1:8080", help="the gateway's HTTP API")
    add_token_arg(ro)
    ro.add_argument("--canary", default="10%", help="device ids (a,b) or a share of the fleet (10%%)")
    ro.add_argument("--watch", type=float, default=60.0, help="seconds of canary telemetry to judge")
    ro.add_argument("--promote-if", default=DEFAULT_PROMOTE_IF,
                    help="condition over offload_rate, fallback_rate, rollbacks, errors, drift, p99_ms, inputs "
                    "(numbers or 'baseline [* + -] N'), joined by and/or")
    ro.add_argument("--line", help="start: move the devices of this model line to the bundle's line (an explicit, "
                    "logged switch; without it a rollout reaches only the bundle's own line)")
    ro.add_argument("--canary-seed", type=int, help="start: seed of the random draw of a percentage of canaries "
                    "(default: a fresh one, recorded in the plan)")
    ro.add_argument("--min-reports", type=int, help="start: distinct canaries that must report in the watch window "
                    "(default: all of them)")
    ro.add_argument("--wait", action="store_true", help="start: wait until it is done, rolled back, failed or "
                    "awaiting a person's approval")
    add_json_flag(ro)
    ro.set_defaults(func=cmd_rollout)
    up = sub.add_parser("upload", help="store a bundle .tar.gz at the running gateway (it verifies the signature)",
                        formatter_class=DefaultsHelpFormatter)
    add_common(up)
    up.add_argument("bundle", help="the bundle's .tar.gz (as `toolchain build` writes it)")
    up.add_argument("--gateway", default="http://127.0.0.1:8080", help="the gateway's HTTP API")
    add_token_arg(up)
    up.add_argument("--name", help="store it under this name (default: the file name without .tar.gz)")
    add_json_flag(up)
    up.set_defaults(func=cmd_upload)
    po = sub.add_parser("policy", help="the refresh policy of the running gateway: show, set FILE, approve --id N")
    add_common(po)
    po.add_argument("action", choices=("show", "set", "approve"))
    po.add_argument("file", nargs="?", help="set: a JSON policy document")
    po.add_argument("--id", type=int, help="approve: the proposal id")
    po.add_argument("--gateway", default="http://127.0.0.1:8080")
    add_token_arg(po)
    add_json_flag(po)
    po.set_defaults(func=cmd_policy)
    c = sub.add_parser("fleet-credentials", help="write mosquitto password + ACL files for a fleet")
    add_common(c)
    c.add_argument("devices", nargs="*", help="device ids")
    c.add_argument("--devices-file", type=Path, help="one device id per line")
    c.add_argument("--out", type=Path, required=True, help="output folder")
    c.add_argument("--prefix", default="fleet")
    c.add_argument("--gateway-user", default="gateway")
    c.add_argument("--admin-user", default="admin")
    add_json_flag(c)
    c.set_defaults(func=cmd_credentials)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
