"""``toolchain refresh``: re-distill the student on the samples the gateway collected (see `toolchain.refresh`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgecore.clikit import add_common, add_json_flag, add_token_arg, emit_json, gateway_token


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "refresh", help="re-distill the student on the gateway's collected samples into a new run, gated",
        description="Pull the samples the gateway collected (GATEWAY_URL over HTTP, or its database URL / SQLite "
        "file), re-distill the run's student on its data plus them (by default as an expert beside the unchanged "
        "student, with a gate that picks per input: refresh.strategy), re-run QAT, export and the production builds "
        "into a NEW run, and check the gates (original test split, held-out collected samples).",
    )
    p.add_argument("--from", dest="source", required=True, metavar="GATEWAY_URL|DB_URL",
                   help="http(s)://gateway:8080, postgresql://..., or a gateway.sqlite path")
    p.add_argument("--run", required=True, type=Path, help="the production run (parent)")
    p.add_argument("--out", required=True, type=Path, help="the new run's directory")
    add_token_arg(p, help="the gateway's token, HTTP only")
    p.add_argument("--device", help="only this device's samples")
    p.add_argument("--targets", help="TARGET-PRECISION,... to build (default: the parent run's bundles)")
    p.add_argument("--sign", type=Path, metavar="KEY", help="sign the new bundles with this Ed25519 private key")
    p.add_argument("--force", action="store_true", help="keep the new bundles even when a gate fails")
    add_json_flag(p)
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from toolchain.refresh import refresh

    key = None
    if args.sign:
        from edgecore.signing import load_private_key

        key = load_private_key(args.sign)
    report = refresh(parent=args.run, out=args.out, source=args.source, token=gateway_token(args.token),
                     device=args.device, targets=[t for t in (args.targets or "").split(",") if t] or None,
                     signing_key=key, force=args.force)
    if args.json:
        emit_json(report)
    return 0
