"""Ed25519 signatures over a bundle's manifest (which lists every file's sha256).

Keys are PEM files: ``NAME.key`` (PKCS#8 private key, mode 0600, stays with
the build) and ``NAME.pub`` (the public key devices and the gateway trust).
A key's id is the first 16 hex digits of the sha256 of its raw public bytes.
The signature file ``manifest.sig`` beside ``manifest.json`` holds one or more
signatures over the manifest's exact bytes, so a bundle can be co-signed by
the old and the new key while a fleet rotates.

Why Ed25519 with plain key files rather than Sigstore: devices are offline
and can't reach a transparency log or an OIDC issuer; a fleet operator
already distributes one file per device (its broker credentials), and a
public key is one more. See docs/security.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from edgecore.errors import BundleTrustError, ConfigError
from edgecore.fsutil import atomic_write_bytes

__all__ = ["TrustedKey", "key_id", "new_keypair", "load_private_key", "load_public_keys", "sign", "check_signature",
           "check_existing", "SIG_SCHEMA"]

SIG_SCHEMA = 1
ALG = "ed25519"


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    key: Any  # cryptography Ed25519PublicKey
    path: str = ""


def _raw_public(pub: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(pub: Any) -> str:
    return hashlib.sha256(_raw_public(pub)).hexdigest()[:16]


def new_keypair(prefix: Path) -> tuple[Path, Path, str]:
    """Write ``PREFIX.key`` (0600) and ``PREFIX.pub``; refuses to overwrite a key. Returns (key, pub, id)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    prefix = Path(prefix)
    key_path, pub_path = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    for p in (key_path, pub_path):
        if p.exists():
            raise ConfigError(f"{p} exists; refusing to overwrite a signing key (choose another name)")
    priv = Ed25519PrivateKey.generate()
    pem = priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    key_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = priv.public_key()
    atomic_write_bytes(pub_path, pub.public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path, key_id(pub)


def _refuse_if_others_can_read(path: Path) -> None:
    """Refuse a private key file that its group or other users may read or write, as ssh does.

    A refusal rather than a warning: a warning scrolls past in a CI log, while a key others can read may
    already be copied, and the fix is one chmod. (POSIX only: Windows has no mode bits to check.)
    """
    if os.name != "posix":
        return
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return  # missing or unreadable: the load below says so
    if mode & 0o077:
        raise ConfigError(f"{path}: private key is accessible by other users (mode {mode:04o}): "
                          f"run `chmod 600 {path}`, and rotate the key if others may have copied it")


def load_private_key(path: Path | str) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{path}: not a readable Ed25519 private key ({type(e).__name__})") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key (make one with `toolchain keys new`)")
    _refuse_if_others_can_read(Path(path))
    return key


def load_public_keys(paths: Iterable[Path | str]) -> list[TrustedKey]:
    """Public keys to trust (a ``.pub`` PEM file each, or a folder of them)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.pub")) if p.is_dir() else [p]
    out: list[TrustedKey] = []
    for f in files:
        try:
            key = serialization.load_pem_public_key(f.read_bytes())
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"{f}: not a readable public key ({type(e).__name__})") from e
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{f}: not an Ed25519 public key")
        out.append(TrustedKey(key_id(key), key, str(f)))
    return out


def sign(manifest_bytes: bytes, private_key: Any, existing: bytes | None = None,
         known: Iterable[TrustedKey] = ()) -> bytes:
    """The ``manifest.sig`` content: ``existing`` signatures (same manifest) plus one by ``private_key``.

    The existing signatures are checked first (`check_existing`): a signature added beside a broken one
    would ship a bundle that devices trusting the broken one's key refuse.
    """
    kid = key_id(private_key.public_key())
    if existing:
        check_existing(manifest_bytes, existing, known, where="manifest.sig", replacing=kid)
    entries = _entries(existing, "manifest.sig") if existing else []
    entries = [e for e in entries if e.get("key_id") != kid]  # re-signing replaces this key's own signature
    entries.append({"alg": ALG, "key_id": kid,
                    "sig": base64.b64encode(private_key.sign(manifest_bytes)).decode()})
    return (json.dumps({"schema": SIG_SCHEMA, "signatures": entries}, indent=2) + "\n").encode()


def check_existing(manifest_bytes: bytes, sig_bytes: bytes, known: Iterable[TrustedKey], *, where: str,
                   replacing: str | None = None) -> list[str]:
    """Every signature in ``sig_bytes`` well-formed, and each by a ``known`` key verifying over ``manifest_bytes``.

    ``replacing``: the key id about to sign again (its old signature is dropped, not checked).
    Returns the key ids whose signatures could not be checked (no public key known for them);
    raises `BundleTrustError` naming the first signature that is malformed or does not verify.
    """
    from cryptography.exceptions import InvalidSignature

    by_id = {k.key_id: k for k in known}
    seen: set[str] = set()
    unchecked: list[str] = []
    for e in _entries(sig_bytes, where):
        kid = e.get("key_id")
        if kid == replacing and replacing is not None:
            continue
        if not isinstance(kid, str) or len(kid) != 16 or any(c not in "0123456789abcdef" for c in kid):
            raise BundleTrustError(f"{where}: a signature has no valid key id ({str(kid)[:20]!r}): "
                                   "remove the signature file and sign afresh")
        if kid in seen:
            raise BundleTrustError(f"{where}: key {kid} signs twice: remove the signature file and sign afresh")
        seen.add(kid)
        try:
            raw = base64.b64decode(str(e.get("sig")), validate=True)
        except ValueError:
            raw = b""
        if e.get("alg") != ALG or len(raw) != 64:
            raise BundleTrustError(f"{where}: the signature by key {kid} is malformed (not a 64-byte {ALG} "
                                   "signature): remove the signature file and sign afresh")
        k = by_id.get(kid)
        if k is None:
            unchecked.append(kid)
            continue
        try:
            k.key.verify(raw, manifest_bytes)
        except InvalidSignature as err:
            raise BundleTrustError(f"{where}: the signature by key {kid} does not match the manifest (manifest "
                                   "edited after signing, or a forged signature): refusing to add "
                                   "another") from err
    return unchecked


def _entries(sig_bytes: bytes, where: str) -> list[dict[str, Any]]:
    try:
        doc = json.loads(sig_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleTrustError(f"{where}: unreadable signature file ({e})") from e
    if not isinstance(doc, dict) or doc.get("schema") != SIG_SCHEMA or not isinstance(doc.get("signatures"), list):
        raise BundleTrustError(f"{where}: not a signature file of schema {SIG_SCHEMA}")
    return [e for e in doc["signatures"] if isinstance(e, dict)]


def check_signature(manifest_bytes: bytes, sig_bytes: bytes | None, trusted: list[TrustedKey], *,
                    where: str) -> str:
    """The id of a trusted key whose signature verifies, or `BundleTrustError` saying why none does."""
    from cryptography.exceptions import InvalidSignature

    if sig_bytes is None:
        raise BundleTrustError(f"{where}: bundle is not signed (sign it with `toolchain build --sign KEY` or "
                               "`toolchain sign`; development only: --allow-unsigned)")
    entries = _entries(sig_bytes, where)
    by_id = {k.key_id: k for k in trusted}
    seen: list[str] = []
    for e in entries:
        kid = str(e.get("key_id"))
        seen.append(kid)
        k = by_id.get(kid)
        if k is None or e.get("alg") != ALG:
            continue
        try:
            k.key.verify(base64.b64decode(str(e.get("sig")), validate=True), manifest_bytes)
            return kid
        except (InvalidSignature, ValueError) as err:
            raise BundleTrustError(f"{where}: signature by key {kid} does not match the manifest "
                                   "(manifest edited after signing, or a forged signature)") from err
    trusted_ids = ", ".join(sorted(by_id)) or "none configured"
    raise BundleTrustError(f"{where}: signed by {', '.join(seen) or 'no key'}, none of which this side trusts "
                           f"(trusted: {trusted_ids})")
