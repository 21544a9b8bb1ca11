"""``toolchain sign BUNDLE --key KEY``: add a signature to a built bundle (co-signing during key rotation)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgecore.clikit import add_common, add_json_flag, emit_json


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sign", help="sign (or co-sign) a built bundle folder and rewrite its .tar.gz",
        description="Check the bundle's hashes and the signatures it has, then add a signature by KEY over its "
        "manifest, keeping the signatures it has (so a fleet can trust the old or the new key while it rotates).",
    )
    p.add_argument("bundle", type=Path, help="bundle folder (its .tar.gz beside it is rewritten)")
    p.add_argument("--key", required=True, type=Path, help="Ed25519 private key (`toolchain keys new`)")
    p.add_argument("--trust-key", action="append", default=[], type=Path, metavar="PUB",
                   help="public key (.pub, or a folder of them) to check an existing signature against; repeat")
    add_json_flag(p)
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgecore.bundle import MANIFEST, SIGNATURE, open_bundle, read_signature, write_tarball
    from edgecore.errors import ConfigError
    from edgecore.fsutil import atomic_write_bytes
    from edgecore.signing import check_existing, key_id, load_private_key, load_public_keys, sign

    if not args.bundle.is_dir():
        raise ConfigError(f"{args.bundle}: sign takes a bundle folder (the .tar.gz is rewritten from it)")
    key = load_private_key(args.key)
    known = load_public_keys(args.trust_key)
    b = open_bundle(args.bundle)  # hashes and listing checked before anything is signed
    manifest = (b.root / MANIFEST).read_bytes()
    existing = read_signature(b.root, where=str(b.root))
    kid = key_id(key.public_key())
    where = str(b.root / SIGNATURE)
    # every existing signature well-formed, and those by keys known here verified, before one is added beside them
    unchecked = check_existing(manifest, existing, known, where=where, replacing=kid) if existing else []
    atomic_write_bytes(b.root / SIGNATURE, sign(manifest, key, existing=existing, known=known))
    tar = write_tarball(b.root)
    report = {"bundle": str(b.root), "tarball": str(tar), "key_id": kid,
              "manifest_sha256": b.manifest_sha256, "unchecked_signatures": unchecked}
    if args.json:
        emit_json(report)
    else:
        print(f"signed {b.root} with key {kid} (and rewrote {tar.name})")
        if unchecked:
            print(f"kept signatures by {', '.join(unchecked)} unchecked (give their .pub with --trust-key to "
                  "check them)")
    return 0
