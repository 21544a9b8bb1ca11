"""``toolchain sign BUNDLE --key KEY``: add a signature to a built bundle (co-signing during key rotation)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgecore.clikit import add_common, add_json_flag, emit_json


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sign", help="sign (or co-sign) a built bundle folder and rewrite its .tar.gz",
        description="Check the bundle's hashes, then add a signature by KEY over its manifest, keeping the "
        "signatures it has (so a fleet can trust the old or the new key while it rotates).",
    )
    p.add_argument("bundle", type=Path, help="bundle folder (its .tar.gz beside it is rewritten)")
    p.add_argument("--key", required=True, type=Path, help="Ed25519 private key (`toolchain keys new`)")
    add_json_flag(p)
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgecore.bundle import MANIFEST, SIGNATURE, open_bundle, write_tarball
    from edgecore.errors import ConfigError
    from edgecore.fsutil import atomic_write_bytes
    from edgecore.signing import key_id, load_private_key, sign

    if not args.bundle.is_dir():
        raise ConfigError(f"{args.bundle}: sign takes a bundle folder (the .tar.gz is rewritten from it)")
    key = load_private_key(args.key)
    b = open_bundle(args.bundle)  # hashes and listing checked before anything is signed
    sig = b.root / SIGNATURE
    atomic_write_bytes(sig, sign((b.root / MANIFEST).read_bytes(), key,
                                 existing=sig.read_bytes() if sig.is_file() else None))
    tar = write_tarball(b.root)
    report = {"bundle": str(b.root), "tarball": str(tar), "key_id": key_id(key.public_key()),
              "manifest_sha256": b.manifest_sha256}
    if args.json:
        emit_json(report)
    else:
        print(f"signed {b.root} with key {report['key_id']} (and rewrote {tar.name})")
    return 0
