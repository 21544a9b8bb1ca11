"""The bundle contract on disk: the one writer and the one reader.

A bundle is a directory (or a ``.tar.gz`` of one) holding ``manifest.json``
(`edgecore.manifest.Manifest`), optionally ``manifest.sig`` (Ed25519
signatures over the manifest, `edgecore.signing`), and the files the manifest
lists with their size and sha256: the artifact, the drift reference, the
routing curve. Nothing else.

`write_bundle` lists every file in the directory, writes the manifest
atomically and signs it. `open_bundle` refuses anything it cannot trust,
naming the problem: an unknown schema version or a mistyped field, a
missing, changed or *unlisted* file, an unsafe path or link, an archive past
its size limits (checked from the headers before anything is written, and
again on the bytes actually written), and, when keys are configured, a
missing or wrong signature. A refused archive leaves nothing behind, and a
bundle opened from a tarball into a temporary folder removes it on `close`.
`targets.load_runner` loads the artifact of an opened bundle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Sequence

from edgecore.errors import BundleTrustError
from edgecore.fsutil import atomic_write_bytes
from edgecore.manifest import (
    DRIFT_REFERENCE,
    SCHEMA_VERSION,
    SUPPORTED_SCHEMAS,
    FileEntry,
    Manifest,
    Routing,
)
from edgecore.spec import InputSpec

__all__ = [
    "MANIFEST", "SIGNATURE", "DRIFT_REFERENCE", "SCHEMA_VERSION", "SUPPORTED_SCHEMAS", "Limits", "Bundle",
    "sha256_file", "file_entries", "read_manifest", "verify_files", "extract_tarball", "open_bundle",
    "write_bundle", "write_tarball", "tarball_path", "TrustPolicy", "read_signature", "MAX_SIGNATURE_BYTES",
]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
_META = (MANIFEST, SIGNATURE)
MAX_MANIFEST_BYTES = 4 << 20
MAX_SIGNATURE_BYTES = 16 << 10  # one signature is about 150 bytes; a rotation needs two or three
RATIO_FLOOR = 8 << 20  # small bundles may compress well (JSON, sparse weights); bombs can't stay this small


@dataclass(frozen=True)
class Limits:
    """Bounds on what opening an archive may write (decompression bombs, file floods)."""

    max_total_bytes: int = 2 << 30
    max_file_bytes: int = 1 << 30
    max_files: int = 10_000
    max_ratio: float = 200.0  # uncompressed / compressed, checked once RATIO_FLOOR bytes are out


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _walk(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if not p.is_dir() or p.is_symlink())


def file_entries(root: Path, names: Sequence[str] | None = None) -> dict[str, FileEntry]:
    """``{relative name: FileEntry}`` for ``names`` (folders expanded), or every file under ``root``."""
    root = Path(root)
    paths: list[Path] = []
    for name in names if names is not None else [""]:
        p = root / name
        paths += [x for x in _walk(p) if x.is_file()] if p.is_dir() else [p]
    out: dict[str, FileEntry] = {}
    for f in paths:
        rel = f.relative_to(root).as_posix()
        if rel not in _META:
            out[rel] = FileEntry(size=f.stat().st_size, sha256=sha256_file(f))
    return out


def _safe_rel(name: str) -> bool:
    p = Path(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name


@dataclass
class Bundle:
    """A bundle whose manifest, files and (when required) signature have been checked."""

    root: Path
    manifest: Manifest
    manifest_sha256: str  # the bundle's identity in telemetry and updates
    signed_by: str | None = None  # the trusted key id whose signature verified
    source: Path | None = None  # what the user gave (a .tar.gz is extracted to a temporary ``root``)
    _cleanup: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """How messages name this bundle: the path the user gave (the tarball), not a temporary folder."""
        return str(self.source if self.source is not None else self.root)

    @property
    def target(self) -> str:
        return self.manifest.target

    @property
    def precision(self) -> str:
        return self.manifest.precision.value

    @property
    def input_spec(self) -> InputSpec:
        return self.manifest.input

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.output.labels)

    @property
    def routing(self) -> Routing | None:
        return self.manifest.routing

    @property
    def version(self) -> str:
        return self.manifest.model.version

    def drift_reference(self) -> dict[str, Any] | None:
        """The listed (hash-checked) drift reference, or None; unreadable content is a `BundleTrustError`."""
        name = self.manifest.drift_reference
        if name is None:
            return None
        try:
            ref = json.loads((self.root / name).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleTrustError(f"bundle {self.name}: unreadable drift reference {name} ({e})") from e
        if not isinstance(ref, dict):
            raise BundleTrustError(f"bundle {self.name}: drift reference {name} is not a JSON object")
        return ref

    def close(self) -> None:
        """Remove the temporary folder a tarball was extracted into (no-op for directories)."""
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> "Bundle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_manifest(root: Path, *, where: str | None = None) -> Manifest:
    """``root``'s manifest, checked; ``where``: how errors name the bundle (default: ``root``'s manifest)."""
    path = Path(root) / MANIFEST
    name = where or str(path)
    if not path.is_file() or path.is_symlink():
        raise BundleTrustError(f"{where or root}: not a bundle (no {MANIFEST})")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleTrustError(f"{name}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        raw = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BundleTrustError(f"{name}: unreadable manifest ({type(e).__name__}: {e})") from e
    return Manifest.from_dict(raw, where=name)


def verify_files(root: Path, manifest: Manifest, *, where: str | None = None) -> None:
    """Every listed file matches (size, sha256) and nothing unlisted is there; all problems at once.
    ``where``: how the error names the bundle (default: ``root``)."""
    root = Path(root)
    problems: list[str] = []
    for name, entry in manifest.files.items():
        if not _safe_rel(name):
            problems.append(f"{name}: unsafe path")
            continue
        p = root / name
        if p.is_symlink() or not p.is_file():
            problems.append(f"{name}: missing" if not p.is_symlink() else f"{name}: is a link")
        elif p.stat().st_size != entry.size:
            problems.append(f"{name}: size {p.stat().st_size} != {entry.size}")
        elif sha256_file(p) != entry.sha256:
            problems.append(f"{name}: sha256 mismatch (file changed or corrupt)")
    unlisted = [p.relative_to(root).as_posix() for p in _walk(root)
                if p.relative_to(root).as_posix() not in manifest.files and p.name not in _META]
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else "")
        problems.append(f"files the manifest does not list: {shown}")
    if problems:
        raise BundleTrustError(f"bundle {where or root} cannot be trusted: " + "; ".join(problems))


class _Counting:
    """A read-only file wrapper that counts the compressed bytes read (for the ratio check)."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f, self.n = f, 0

    def read(self, size: int = -1) -> bytes:
        b = self._f.read(size)
        self.n += len(b)
        return b




def _copy_member(tf: tarfile.TarFile, m: tarfile.TarInfo, out: Path, budget: int,
                 check: Callable[[int], None]) -> int:
    src = tf.extractfile(m)
    if src is None:
        raise BundleTrustError(f"member {m.name!r} has no data")
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(out, "xb") as f:
        while block := src.read(1 << 20):
            written += len(block)
            if written > budget:
                raise BundleTrustError(f"member {m.name!r} is larger than its header says or than the limits")
            check(written)
            f.write(block)
    return written


def extract_tarball(tar_path: Path, dest: Path, *, limits: Limits = Limits()) -> Path:
    """Stream a bundle archive into ``dest`` under ``limits``; returns the bundle folder in it.

    Only regular files and folders with safe relative names are accepted. When
    the manifest comes first (as `write_tarball` writes it), every later
    member must be listed with its size *before* it is written.
    """
    tar_path, dest = Path(tar_path), Path(dest)
    total = files = 0
    listed: dict[str, FileEntry] | None = None
    prefix = ""  # the bundle folder inside the archive, known once the manifest is read
    try:
        with open(tar_path, "rb") as raw:
            counting = _Counting(raw)
            with tarfile.open(fileobj=counting, mode="r|gz") as tf:  # type: ignore[call-overload]
                for m in tf:
                    if not _safe_rel(m.name) or not (m.isfile() or m.isdir()):
                        raise BundleTrustError(f"unsafe member {m.name!r} (links, devices and absolute or '..' "
                                               "paths are refused)")
                    if m.isdir():
                        continue
                    files += 1
                    out = dest / m.name
                    if files > limits.max_files:
                        raise BundleTrustError(f"more than {limits.max_files} files")
                    if m.size > limits.max_file_bytes or total + m.size > limits.max_total_bytes:
                        raise BundleTrustError(f"{m.name!r} ({m.size} bytes) is past the size limits "
                                               f"({limits.max_file_bytes} per file, {limits.max_total_bytes} in all)")
                    rel = m.name[len(prefix):] if m.name.startswith(prefix) else m.name
                    if Path(m.name).name == SIGNATURE and m.size > MAX_SIGNATURE_BYTES:
                        raise BundleTrustError(f"{SIGNATURE} is {m.size} bytes, more than the "
                                               f"{MAX_SIGNATURE_BYTES} a signature file may hold")
                    if listed is not None and rel not in _META:
                        entry = listed.get(rel)
                        if entry is None or entry.size != m.size:
                            raise BundleTrustError(f"{rel!r} is not listed in the manifest" if entry is None else
                                                   f"{rel!r} is {m.size} bytes, the manifest says {entry.size}")
                    def ratio(written: int, before: int = total) -> None:
                        t = before + written
                        if t > RATIO_FLOOR and t / max(counting.n, 1) > limits.max_ratio:
                            raise BundleTrustError(f"compression ratio past {limits.max_ratio:g} "
                                                   "(a decompression bomb?)")

                    total += _copy_member(tf, m, out, min(m.size, limits.max_file_bytes), ratio)
                    if Path(m.name).name == MANIFEST and listed is None and files == 1:
                        listed = read_manifest(out.parent, where=f"its {m.name}").files
                        prefix = m.name[: -len(MANIFEST)]
    except BundleTrustError as e:
        raise BundleTrustError(f"{tar_path}: refused: {e}") from e
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise BundleTrustError(f"{tar_path}: not a readable bundle archive ({type(e).__name__}: {e})") from e
    return _bundle_root(tar_path, dest)


def _bundle_root(tar_path: Path, dest: Path) -> Path:
    if (dest / MANIFEST).exists():
        return dest
    entries = list(dest.iterdir())
    if len(entries) == 1 and (entries[0] / MANIFEST).exists():
        return entries[0]
    raise BundleTrustError(f"{tar_path}: archive holds no {MANIFEST}")


def read_signature(root: Path, *, where: str | None = None) -> bytes | None:
    """``root``'s ``manifest.sig`` bytes (None when absent), refused past `MAX_SIGNATURE_BYTES`."""
    sig = Path(root) / SIGNATURE
    if not sig.is_file() or sig.is_symlink():
        return None
    size = sig.stat().st_size
    if size > MAX_SIGNATURE_BYTES:
        raise BundleTrustError(f"{where or root}: {SIGNATURE} is {size} bytes, more than the "
                               f"{MAX_SIGNATURE_BYTES} a signature file may hold")
    return sig.read_bytes()


def _check_signature(root: Path, keys: Sequence[Any], require: bool, where: str | None = None) -> str | None:
    from edgecore.signing import check_signature

    sig_bytes = read_signature(root, where=where)  # an oversized one is refused even when none is required
    if not keys and not require:
        return None
    if not keys:
        raise BundleTrustError(f"{where or root}: signatures are required but no trusted public key is configured")
    return check_signature((root / MANIFEST).read_bytes(), sig_bytes, list(keys), where=where or str(root))


class _RemoveOnce:
    """Removes a temporary extraction folder once (on close, garbage collection or interpreter exit)."""

    def __init__(self, path: Path) -> None:
        self.path: Path | None = path

    def __call__(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


def open_bundle(path: str | os.PathLike[str], *, extract_to: Path | None = None, limits: Limits = Limits(),
                keys: Sequence[Any] = (), require_signature: bool = False, tmp_prefix: str = "bundle-") -> Bundle:
    """Open and verify a bundle directory or ``.tar.gz``. Raises `BundleTrustError`.

    ``keys`` (`edgecore.signing.TrustedKey`): when given, a signature by one of
    them is required. ``require_signature`` without keys refuses everything
    (a device configured to require signatures but given no key). A tarball is
    unpacked into ``extract_to``, or a new temporary folder named ``tmp_prefix``…
    (removed on `Bundle.close`; a process killed outright leaves it, so a long-lived
    owner names it to find its own leftovers: `device_agent.updates.clean_stale`).
    """
    p = given = Path(path)
    if not p.exists():
        raise BundleTrustError(f"{p}: no such bundle")
    cleanup = None
    where = None  # errors name the user's path: a tarball's, not the folder it is extracted to
    if p.is_file():
        where = str(given)
        made = extract_to is None
        dest = Path(tempfile.mkdtemp(prefix=tmp_prefix)) if made else Path(extract_to)  # type: ignore[arg-type]
        dest.mkdir(parents=True, exist_ok=True)
        try:
            p = extract_tarball(p, dest, limits=limits)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        if made:
            cleanup = _RemoveOnce(dest)
    try:
        manifest = read_manifest(p, where=where and f"{where} ({MANIFEST})")
        verify_files(p, manifest, where=where)
        signed_by = _check_signature(p, keys, require_signature, where)
    except BaseException:
        if cleanup is not None:
            cleanup()
        elif extract_to is not None and Path(path).is_file():
            shutil.rmtree(extract_to, ignore_errors=True)
        raise
    b = Bundle(root=p, manifest=manifest, manifest_sha256=sha256_file(p / MANIFEST), signed_by=signed_by,
               source=given, _cleanup=cleanup)
    if cleanup is not None:
        weakref.finalize(b, cleanup)
    return b


@dataclass(frozen=True)
class TrustPolicy:
    """What a receiving side (a device, the gateway's upload) accepts.

    ``keys``: trusted public keys (`edgecore.signing.TrustedKey`); a bundle must be signed by one of them.
    ``allow_unsigned``: development only; with no keys configured, unsigned bundles pass (logged loudly).
    The default, no keys and not allowing unsigned, refuses every bundle with a message saying what to set.
    """

    keys: tuple[Any, ...] = ()
    allow_unsigned: bool = False

    @classmethod
    def from_paths(cls, paths: Sequence[Path | str] = (), *, allow_unsigned: bool = False) -> "TrustPolicy":
        from edgecore.signing import load_public_keys

        return cls(keys=tuple(load_public_keys(paths)), allow_unsigned=allow_unsigned)

    def open(self, path: str | os.PathLike[str], **kw: Any) -> Bundle:
        """`open_bundle` under this policy."""
        try:
            return open_bundle(path, keys=self.keys, require_signature=not self.allow_unsigned, **kw)
        except BundleTrustError as e:
            if not self.keys and not self.allow_unsigned and "no trusted public key" in str(e):
                raise BundleTrustError(f"{e} (give the release key's .pub with --trust-key; development only: "
                                       "--allow-unsigned)") from e
            raise

    def check(self, bundle: Bundle) -> Bundle:
        """Check an already opened bundle's signature under this policy (returns it, with ``signed_by``)."""
        bundle.signed_by = _check_signature(bundle.root, self.keys, not self.allow_unsigned,
                                            bundle.name if bundle.source is not None else None)
        return bundle

    def warn_if_open(self, who: str) -> None:
        if self.allow_unsigned and not self.keys:
            log.warning("%s accepts UNSIGNED bundles (--allow-unsigned): anyone who can send an update chooses "
                        "the model. Development only.", who)


def write_bundle(root: Path, manifest: Manifest, *, signing_key: Any = None) -> Manifest:
    """The one writer: list every file under ``root`` in ``manifest``, write it atomically, sign it.

    Returns the manifest as written (with its ``files``). The result reads
    back through `read_manifest` (checked here, so a writer bug never ships).
    """
    from edgecore.signing import sign

    root = Path(root)
    (root / SIGNATURE).unlink(missing_ok=True)
    links = [p for p in _walk(root) if p.is_symlink()]
    if links:
        raise BundleTrustError(f"{root}: links cannot go into a bundle: {', '.join(map(str, links[:3]))}")
    written = manifest.with_files(file_entries(root))
    data = (json.dumps(written.to_dict(), indent=2, default=_json_default) + "\n").encode()
    atomic_write_bytes(root / MANIFEST, data)
    Manifest.from_dict(json.loads(data), where=str(root / MANIFEST))
    if signing_key is not None:
        atomic_write_bytes(root / SIGNATURE, sign(data, signing_key))
    return written


def _json_default(o: Any) -> Any:
    from edgecore.fsutil import _json_default as default

    return default(o)


def tarball_path(bundle_dir: Path) -> Path:
    return Path(bundle_dir).with_name(Path(bundle_dir).name + ".tar.gz")


def write_tarball(bundle_dir: Path) -> Path:
    """``BUNDLE.tar.gz`` beside the folder, manifest and signature first, written to a temp file and renamed."""
    bundle_dir = Path(bundle_dir)
    dest = tarball_path(bundle_dir)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz") as tf:
            tf.add(bundle_dir, arcname=bundle_dir.name, recursive=False)
            for name in _META:
                if (bundle_dir / name).is_file():
                    tf.add(bundle_dir / name, arcname=f"{bundle_dir.name}/{name}")
            for p in _walk(bundle_dir):
                rel = p.relative_to(bundle_dir).as_posix()
                if rel not in _META:
                    tf.add(p, arcname=f"{bundle_dir.name}/{rel}", recursive=False)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest
