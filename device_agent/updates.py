"""Fetch, verify and smoke-test a bundle before the agent swaps to it.

Why so careful: a model update reaches devices nobody can touch. The new
bundle is downloaded over HTTP from the gateway (only from URLs under the
base URLs the agent was configured with; redirects elsewhere are refused),
its hash compared with the one in the command (the tarball's or the
manifest's sha256), every file
verified by `open_bundle`, loaded with this device's runtime and asked to
answer a smoke input; only then does the agent swap. Any failure leaves the
running bundle in place and is reported.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

import numpy as np

from edgecore.bundle import Bundle, TrustPolicy, sha256_file
from edgecore.errors import BundleTrustError
from edgecore.tasks import get_task

log = logging.getLogger(__name__)

MAX_DOWNLOAD = 512 << 20
#: what this agent unpacks or downloads into, so that a start finds what a killed agent left: bundles unpacked
#: into the temp folder (``device-agent.<device>.<pid>.…``) and downloads in the state dir (``fetch.<pid>.…``)
UNPACK_PREFIX = "device-agent."
FETCH_PREFIX = "fetch."
#: a download (bundle or test data) must be complete within this many seconds, however it trickles
DOWNLOAD_DEADLINE_S = 300.0
BUNDLES = "bundles"


def _origin_and_path(url: str) -> tuple[tuple[str, str, int], str] | None:
    try:
        u = urlsplit(url)
        port = u.port or {"http": 80, "https": 443}.get(u.scheme, 0)
    except ValueError:
        return None
    if u.scheme not in ("http", "https") or not u.hostname or u.username or u.password:
        return None
    path = u.path or "/"
    if any(seg in (".", "..") for seg in path.split("/")) or "%2e" in path.lower():
        return None  # a dot segment could climb out of the base once the server normalises it
    return (u.scheme, u.hostname.lower(), port), path


def url_allowed(url: str, bases: Sequence[str]) -> bool:
    """True when ``url`` is under one of ``bases`` (same scheme, host and port; path below the base's)."""
    got = _origin_and_path(url)
    if got is None:
        return False
    for base in bases:
        b = _origin_and_path(base)
        if b is not None and b[0] == got[0]:
            root = b[1].rstrip("/") + "/"
            if got[1] == b[1].rstrip("/") or got[1].startswith(root):
                return True
    return False


class _StayUnder(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL under the allowed bases."""

    def __init__(self, bases: Sequence[str]) -> None:
        self.bases = tuple(bases)

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if not url_allowed(newurl, self.bases):
            raise urllib.error.URLError(f"redirect to {newurl} is outside the allowed update bases")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(url: str, dest: Path, *, allowed: Sequence[str], timeout: float = 30.0,
             max_bytes: int = MAX_DOWNLOAD, deadline_s: float = DOWNLOAD_DEADLINE_S, what: str = "bundle") -> Path:
    """Fetch ``url`` (under ``allowed``) to ``dest``, at most ``max_bytes`` within ``deadline_s`` in all.

    Errors say "<what> download failed" only: details go to the log. Why so terse: the outcome of an update
    or a bench job is published in the device's status, and telling "connection refused" from "timed out" from
    "404" there would make every device a port scanner for whoever can send it commands. Bounded because a
    server may send a body without end, or drip it a byte at a time: the body is streamed to ``dest`` (never
    held in memory), and a partial file is removed.
    """
    if not url_allowed(url, allowed):
        raise BundleTrustError(
            f"{what} URL is not on the update allow-list"
            + ("" if allowed else " (this agent takes downloads by URL only with --update-base)")
        )
    opener = urllib.request.build_opener(_StayUnder(allowed))
    end = time.monotonic() + deadline_s
    try:
        with opener.open(url, timeout=timeout) as r, open(dest, "wb") as f:
            length = r.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise _TooBig(f"Content-Length {length} is past the {max_bytes}-byte bound")
            total = 0
            while block := r.read1(1 << 16):  # what has arrived, not a full buffer: a drip cannot stall here
                total += len(block)
                if total > max_bytes:
                    raise _TooBig(f"more than {max_bytes} bytes")
                if time.monotonic() > end:
                    raise _TooBig(f"not done within {deadline_s:g} s")
                f.write(block)
    except (_TooBig, urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        log.error("downloading %s failed: %s", url, e)
        Path(dest).unlink(missing_ok=True)
        raise BundleTrustError(f"{what} download failed") from e
    return dest


class _TooBig(Exception):
    """A download past its size or time bound (logged; the status says only "download failed")."""


def _open_verified(tar: Path, extract: Path, *, trust: TrustPolicy) -> Bundle:
    """Open and verify a downloaded bundle (hashes, listing, limits, signature); "not a bundle" upstream,
    the reason in the log."""
    try:
        return trust.open(tar, extract_to=extract)
    except BundleTrustError as e:
        log.error("downloaded bundle refused: %s", e)
        raise BundleTrustError("not a bundle this device trusts (the reason is in the device's log)") from e


def fetch_bundle(*, url: str, sha256: str | None, state_dir: Path, allowed: Sequence[str] = (),
                 trust: TrustPolicy = TrustPolicy()) -> Bundle:
    """Download ``url`` (a bundle ``.tar.gz`` under ``allowed``), check ``sha256``, open it under ``state_dir``."""
    state_dir = Path(state_dir)
    (state_dir / BUNDLES).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{FETCH_PREFIX}{os.getpid()}.", dir=state_dir))
    try:
        tar = download(url, tmp / "bundle.tar.gz", allowed=allowed)
        tar_sha = sha256_file(tar)
        extract = tmp / "x"
        extract.mkdir()
        bundle = _open_verified(tar, extract, trust=trust)
        if sha256 is not None and sha256 not in (tar_sha, bundle.manifest_sha256):
            raise BundleTrustError(
                f"bundle has sha256 {tar_sha} (manifest {bundle.manifest_sha256}), the command expected {sha256}"
            )
        final = state_dir / BUNDLES / bundle.manifest_sha256[:16]
        if final.exists():
            shutil.rmtree(final)
        shutil.move(str(bundle.root), final)
        return trust.open(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _device_tag(device_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", device_id)[:64]


def unpack_prefix(device_id: str) -> str:
    """The temp-folder prefix this process unpacks a device's bundle tarballs under."""
    return f"{UNPACK_PREFIX}{_device_tag(device_id)}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's process, or one we cannot ask about: not ours to clean
        return True
    return True


def clean_stale(device_id: str, state_dir: Path | None = None) -> list[Path]:
    """Remove what an agent of ``device_id`` that is no longer running left behind (a ``kill -9`` skips every
    cleanup): its bundles unpacked in the temp folder, and unfinished downloads in ``state_dir``. Only folders
    of this user, named with this agent's prefixes, whose process is gone; returns what went."""
    spots = [(Path(tempfile.gettempdir()), f"{UNPACK_PREFIX}{_device_tag(device_id)}.")]
    if state_dir is not None:
        spots += [(Path(state_dir), FETCH_PREFIX), (Path(state_dir), "bench-data.")]
    gone: list[Path] = []
    uid = os.getuid() if hasattr(os, "getuid") else None
    for folder, prefix in spots:
        try:
            found = [p for p in folder.glob(f"{_glob_escape(prefix)}*") if p.is_dir() and not p.is_symlink()]
        except OSError:
            continue
        for p in found:
            pid = p.name[len(prefix):].split(".", 1)[0]
            try:
                owner = p.stat().st_uid
            except OSError:
                continue
            if not pid.isdigit() or (uid is not None and owner != uid) or _alive(int(pid)):
                continue
            shutil.rmtree(p, ignore_errors=True)
            log.info("removed %s, left by an agent that is no longer running", p)
            gone.append(p)
    return gone


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def open_for_device(trust: TrustPolicy, bundle: str | os.PathLike[str], device_id: str,
                    state_dir: Path | None = None) -> Bundle:
    """Clean what a killed agent of this device left (`clean_stale`), then open ``bundle`` under ``trust``, a
    tarball unpacked under this process's `unpack_prefix`."""
    clean_stale(device_id, state_dir)
    return trust.open(bundle, tmp_prefix=unpack_prefix(device_id))


def prune_bundles(state_dir: Path, keep: Sequence[Path]) -> list[Path]:
    """Remove fetched bundles under ``state_dir`` except ``keep`` (current and previous); returns what went."""
    root = Path(state_dir) / BUNDLES
    if not root.is_dir():
        return []
    kept = {Path(k).resolve() for k in keep}
    gone = [p for p in root.iterdir() if p.resolve() not in kept]
    for p in gone:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return gone


def smoke_test(bundle: Bundle, runner: object) -> None:
    """The runner must answer a neutral input with finite outputs of the shape the bundle's task reads (a
    classifier: one logit per label)."""
    spec = bundle.input_spec
    x = spec.preprocess(np.zeros((1, *spec.sample_shape), np.float32))
    try:
        logits = np.asarray(runner.run(x))  # type: ignore[attr-defined]
    except Exception as e:
        raise BundleTrustError(f"bundle {bundle.name} failed its smoke input: {e}") from e
    want = (1, *get_task(bundle.manifest.task).output_shape(len(bundle.labels)))
    if logits.shape != want or not np.all(np.isfinite(logits)):
        raise BundleTrustError(
            f"bundle {bundle.name} answered its smoke input with shape {list(logits.shape)}"
            f" (expected {list(want)}) or non-finite values"
        )


def check_line(bundle: Bundle, running: str, allow_line_change: bool, *, what: str) -> None:
    """Refuse a bundle of another model line than the one running, unless the command allows the change."""
    line = bundle.manifest.model.name
    if line == running:
        return
    if not allow_line_change:
        raise BundleTrustError(f"bundle {what} is model line {line}, this device runs {running}; refused")
    log.warning("model line change: bundle %s is model line %s, this device ran %s (allowed by the command)",
                what, line, running)


class ReleaseHistory:
    """What this device has run, per model line: the highest release number, and the bundles (manifest sha256).

    Why: a signed bundle stays validly signed for ever, so a signature alone cannot stop a *downgrade* (an older
    release, with the bugs or the accuracy it had, pushed again: TUF's rollback attack). A device refuses a bundle
    whose release is lower than one it ran in the same line (an unnumbered one counts as lower), except a rollback
    the gateway orders to a bundle it ran before. Kept in ``STATE/releases.json`` (written atomically), so a
    restart does not forget.
    """

    MAX_BUNDLES = 64  # the bundles remembered (a rollback goes to a recent one)

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.highest: dict[str, int] = {}
        self.ran: list[str] = []
        if path is not None and path.is_file():
            try:
                doc = json.loads(path.read_text())
                self.highest = {str(k): int(v) for k, v in dict(doc.get("highest") or {}).items()}
                self.ran = [str(x) for x in list(doc.get("ran") or [])][-self.MAX_BUNDLES:]
            except (OSError, ValueError, TypeError, AttributeError) as e:
                log.warning("%s: unreadable release history (%s); starting a new one", path, e)

    def check(self, bundle: Bundle, *, rollback: bool, what: str) -> None:
        """Refuse a downgrade (`BundleTrustError`), unless ``rollback`` to a bundle this device ran before."""
        line, release = bundle.manifest.model.name, bundle.manifest.model.release
        high = self.highest.get(line)
        if high is None or (release is not None and release >= high):
            return
        if rollback and bundle.manifest_sha256 in self.ran:
            log.warning("bundle %s: release %s of model line %s, below the %d this device ran: a rollback the "
                        "gateway ordered to a bundle this device ran before", what, release, line, high)
            return
        raise BundleTrustError(
            f"bundle {what} is {'an unnumbered release' if release is None else f'release {release}'} of model line "
            f"{line}, below release {high} this device ran: refused (a downgrade; only a rollback the gateway orders "
            "to a bundle this device ran before is accepted)")

    def record(self, bundle: Bundle) -> None:
        """``bundle`` now runs here."""
        line, release = bundle.manifest.model.name, bundle.manifest.model.release
        if release is not None and release > self.highest.get(line, -1):
            self.highest[line] = release
        sha = bundle.manifest_sha256
        self.ran = [x for x in self.ran if x != sha][-(self.MAX_BUNDLES - 1):] + [sha]
        if self.path is not None:
            from edgecore.fsutil import atomic_write_json

            try:
                atomic_write_json(self.path, {"highest": self.highest, "ran": self.ran})
            except OSError as e:  # a full disk: the bundle runs; the history is written with the next one
                log.warning("%s: cannot write the release history (%s)", self.path, e)
