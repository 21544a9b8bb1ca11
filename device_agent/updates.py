"""Fetch, verify and smoke-test a bundle before the agent swaps to it.

Why so careful: a model update reaches devices nobody can touch. The new
bundle is downloaded over HTTP from the gateway, its hash compared with the
one in the command (the tarball's or the manifest's sha256), every file
verified by `open_bundle`, loaded with this device's runtime and asked to
answer a smoke input; only then does the agent swap. Any failure leaves the
running bundle in place and is reported.
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from edgecore.bundle import Bundle, open_bundle, sha256_file
from edgecore.errors import BundleTrustError

MAX_DOWNLOAD = 512 << 20


def download(url: str, dest: Path, *, timeout: float = 30.0, max_bytes: int = MAX_DOWNLOAD) -> Path:
    if not url.startswith(("http://", "https://")):
        raise BundleTrustError(f"bundle URL {url!r} must be http(s)")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(dest, "wb") as f:
            total = 0
            while block := r.read(1 << 20):
                total += len(block)
                if total > max_bytes:
                    raise BundleTrustError(f"{url}: larger than {max_bytes} bytes")
                f.write(block)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise BundleTrustError(f"cannot download bundle {url}: {e}") from e
    return dest


def fetch_bundle(*, url: str, sha256: str | None, state_dir: Path) -> Bundle:
    """Download ``url`` (a bundle ``.tar.gz``), check ``sha256`` and open it under ``state_dir``."""
    state_dir = Path(state_dir)
    (state_dir / "bundles").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="fetch-", dir=state_dir))
    try:
        tar = download(url, tmp / "bundle.tar.gz")
        tar_sha = sha256_file(tar)
        extract = tmp / "x"
        extract.mkdir()
        bundle = open_bundle(tar, extract_to=extract)
        if sha256 is not None and sha256 not in (tar_sha, bundle.manifest_sha256):
            raise BundleTrustError(
                f"bundle from {url} has sha256 {tar_sha} (manifest {bundle.manifest_sha256}), "
                f"the command expected {sha256}"
            )
        final = state_dir / "bundles" / bundle.manifest_sha256[:16]
        if final.exists():
            shutil.rmtree(final)
        shutil.move(str(bundle.root), final)
        return open_bundle(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smoke_test(bundle: Bundle, runner: object) -> None:
    """The runner must answer a neutral input with finite logits, one per label."""
    spec = bundle.input_spec
    x = spec.preprocess(np.zeros((1, *spec.sample_shape), np.float32))
    try:
        logits = np.asarray(runner.run(x))  # type: ignore[attr-defined]
    except Exception as e:
        raise BundleTrustError(f"bundle {bundle.root} failed its smoke input: {e}") from e
    n = len(bundle.labels)
    if logits.shape != (1, n) or not np.all(np.isfinite(logits)):
        raise BundleTrustError(
            f"bundle {bundle.root} answered its smoke input with shape {list(logits.shape)}"
            f" (expected [1, {n}]) or non-finite values"
        )
