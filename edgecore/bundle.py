"""The bundle contract: manifest schema, hashing, and the trust checks.

A bundle is a directory (or a ``.tar.gz`` of one) holding ``manifest.json``,
the artifact files and ``drift_reference.json``. The toolchain writes it
(`toolchain.bundle`) with the helpers here; `targets.load_runner`
loads its artifact; the agent opens it with
`open_bundle`, which refuses anything it cannot trust, naming the problem:
an unknown schema version, a missing file, a size or sha256 mismatch, an
unsafe path, or a target whose runtime this device lacks.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecore.errors import BundleTrustError
from edgecore.spec import InputSpec

SCHEMA_VERSION = 1
SUPPORTED_SCHEMAS = (1,)
MANIFEST = "manifest.json"
DRIFT_REFERENCE = "drift_reference.json"
REQUIRED_KEYS = ("schema_version", "model", "target", "precision", "input", "output", "files", "artifact")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{relative name: {size, sha256}}`` for files (directories are expanded)."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        p = root / name
        paths = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in paths:
            rel = f.relative_to(root).as_posix()
            out[rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    return out


def _safe_rel(name: str) -> bool:
    p = Path(name)
    return not p.is_absolute() and ".." not in p.parts


@dataclass(frozen=True)
class Bundle:
    """A bundle whose manifest and files have been checked."""

    root: Path
    manifest: dict[str, Any]
    manifest_sha256: str  # the bundle's identity in telemetry and updates

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_dict(self.manifest["input"])

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["output"]["labels"])

    @property
    def routing(self) -> dict[str, Any]:
        return dict(self.manifest.get("routing") or {})

    @property
    def version(self) -> str:
        return str(self.manifest["model"].get("version", "unknown"))

    def drift_reference(self) -> dict[str, Any] | None:
        p = self.root / DRIFT_REFERENCE
        return json.loads(p.read_text()) if p.exists() else None


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise BundleTrustError(f"{root}: not a bundle (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleTrustError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise BundleTrustError(f"{path}: manifest is not a JSON object")
    version = manifest.get("schema_version")
    if version not in SUPPORTED_SCHEMAS:
        raise BundleTrustError(
            f"{path}: unknown bundle schema version {version!r} (this agent reads {list(SUPPORTED_SCHEMAS)}); "
            "rebuild the bundle or update the agent"
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleTrustError(f"{path}: manifest lacks {', '.join(missing)}")
    return manifest


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Check every listed file's size and sha256; report all problems at once."""
    problems: list[str] = []
    for name, entry in manifest["files"].items():
        if not _safe_rel(name):
            problems.append(f"{name}: unsafe path")
            continue
        p = root / name
        if not p.is_file():
            problems.append(f"{name}: missing")
        elif p.stat().st_size != entry.get("size"):
            problems.append(f"{name}: size {p.stat().st_size} != {entry.get('size')}")
        elif sha256_file(p) != entry.get("sha256"):
            problems.append(f"{name}: sha256 mismatch (file changed or corrupt)")
    main = manifest["artifact"].get("main")
    if main and not any(n == main or n.startswith(main.rstrip("/") + "/") for n in manifest["files"]):
        problems.append(f"{main}: artifact not listed in files")
    if problems:
        raise BundleTrustError(f"bundle {root} cannot be trusted: " + "; ".join(problems))


def extract_tarball(tar_path: Path, dest: Path) -> Path:
    """Extract a bundle tarball safely (no absolute paths, links or ``..``)."""
    try:
        with tarfile.open(tar_path, "r:gz") as tf:
            for m in tf.getmembers():
                if not _safe_rel(m.name) or not (m.isfile() or m.isdir()):
                    raise BundleTrustError(f"{tar_path}: unsafe member {m.name!r}")
            tf.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BundleTrustError(f"{tar_path}: not a readable bundle archive ({e})") from e
    entries = [p for p in dest.iterdir()]
    if (dest / MANIFEST).exists():
        return dest
    if len(entries) == 1 and (entries[0] / MANIFEST).exists():
        return entries[0]
    raise BundleTrustError(f"{tar_path}: archive holds no {MANIFEST}")


def open_bundle(path: str | os.PathLike[str], *, extract_to: Path | None = None) -> Bundle:
    """Open and verify a bundle directory or ``.tar.gz``. Raises `BundleTrustError`."""
    p = Path(path)
    if not p.exists():
        raise BundleTrustError(f"{p}: no such bundle")
    if p.is_file():
        dest = extract_to or Path(tempfile.mkdtemp(prefix="bundle-"))
        dest.mkdir(parents=True, exist_ok=True)
        p = extract_tarball(p, dest)
    manifest = read_manifest(p)
    verify_files(p, manifest)
    return Bundle(root=p, manifest=manifest, manifest_sha256=sha256_file(p / MANIFEST))
