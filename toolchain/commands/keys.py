"""``toolchain keys new NAME``: an Ed25519 key pair for signing bundles."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgecore.clikit import add_common, add_json_flag, emit_json


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "keys", help="make signing keys for bundles (Ed25519)",
        description="Make an Ed25519 key pair: NAME.key (private, mode 0600: keep it with the build) and "
        "NAME.pub (give it to devices with `device-agent run --trust-key` and to the gateway).",
    )
    sub = p.add_subparsers(title="actions", metavar="ACTION", required=True)
    new = sub.add_parser("new", help="make NAME.key and NAME.pub")
    new.add_argument("name", type=Path, help="path prefix of the key files, e.g. keys/release-2026")
    add_json_flag(new)
    add_common(new)
    new.set_defaults(func=run_new)
    add_common(p)


def run_new(args: argparse.Namespace) -> int:
    from edgecore.signing import new_keypair

    key, pub, kid = new_keypair(args.name)
    report = {"private_key": str(key), "public_key": str(pub), "key_id": kid}
    if args.json:
        emit_json(report)
    else:
        print(f"key {kid}\n  private: {key} (keep secret; sign with `toolchain build --sign {key}`)\n"
              f"  public:  {pub} (devices: `device-agent run --trust-key {pub}`)")
    return 0
