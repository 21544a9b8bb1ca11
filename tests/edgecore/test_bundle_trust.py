"""Strict, bounded, signed bundles: every class of untrusted bundle is refused, and nothing is left behind."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

import pytest

from edgecore.bundle import SIGNATURE, Limits, open_bundle, tarball_path, write_bundle, write_tarball
from edgecore.errors import BundleTrustError, ConfigError
from edgecore.signing import load_private_key, load_public_keys, new_keypair

from .conftest import make_bundle, make_manifest


def _temp_bundles() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("bundle-")}


def _tar(path: Path, members: list[tuple[str, bytes]], *, prefix: str = "b/") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members:
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _members(bundle_dir: Path) -> list[tuple[str, bytes]]:
    first = [("manifest.json", (bundle_dir / "manifest.json").read_bytes())]
    return first + [(p.name, p.read_bytes()) for p in sorted(bundle_dir.iterdir())
                    if p.is_file() and p.name != "manifest.json"]


# ------------------------------------------------------------------ strict: nothing unlisted
def test_a_good_bundle_opens_as_folder_and_tarball(bundle_dir: Path):
    before = _temp_bundles()
    b = open_bundle(bundle_dir)
    assert b.signed_by is None and b.routing.threshold == 0.7 and b.drift_reference()["temperature"] == 1.5
    with open_bundle(tarball_path(bundle_dir)) as t:
        assert t.manifest_sha256 == b.manifest_sha256 and t.root.is_dir()
        extracted = t.root
    assert not extracted.exists() and _temp_bundles() == before


@pytest.mark.parametrize("extra", ["extra.bin", "sub/dir/payload.txt", "drift_reference.json.bak"])
def test_unlisted_files_are_refused_in_folders(bundle_dir: Path, extra: str):
    p = bundle_dir / extra
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x" * 10)
    with pytest.raises(BundleTrustError, match=f"files the manifest does not list: {extra}"):
        open_bundle(bundle_dir)


def test_unlisted_files_are_refused_in_archives_before_writing(bundle_dir: Path, tmp_path: Path):
    before = _temp_bundles()
    tar = _tar(tmp_path / "x.tar.gz", [*_members(bundle_dir), ("evil.bin", b"\0" * 4096)])
    with pytest.raises(BundleTrustError, match="'evil.bin' is not listed in the manifest"):
        open_bundle(tar)
    assert _temp_bundles() == before
    dest = tmp_path / "dest"
    with pytest.raises(BundleTrustError):
        open_bundle(tar, extract_to=dest)
    assert not dest.exists()


def test_an_edited_drift_reference_is_refused(bundle_dir: Path):
    (bundle_dir / "drift_reference.json").write_text('{"measure": "max_prob", "temperature": 99}')
    with pytest.raises(BundleTrustError, match="drift_reference.json: (size|sha256)"):
        open_bundle(bundle_dir)


def test_links_are_refused(bundle_dir: Path, tmp_path: Path):
    (bundle_dir / "model.onnx").unlink()
    (bundle_dir / "model.onnx").symlink_to("/etc/hostname")
    with pytest.raises(BundleTrustError, match="model.onnx: is a link"):
        open_bundle(bundle_dir)
    with pytest.raises(BundleTrustError, match="links cannot go into a bundle"):
        write_bundle(bundle_dir, make_manifest())
    tar = tmp_path / "l.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        info = tarfile.TarInfo("b/model.onnx")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(BundleTrustError, match="unsafe member"):
        open_bundle(tar)


@pytest.mark.parametrize("name", ["../escape.txt", "/abs.txt", "b/../../x"])
def test_unsafe_paths_are_refused(tmp_path: Path, name: str):
    tar = _tar(tmp_path / "p.tar.gz", [(name, b"x")], prefix="")
    with pytest.raises(BundleTrustError, match="unsafe member"):
        open_bundle(tar)
    assert not (tmp_path / "escape.txt").exists()


# ------------------------------------------------------------------ bounded extraction
def test_decompression_bomb_is_refused_by_ratio(bundle_dir: Path, tmp_path: Path):
    """Zeros compress ~1000:1; the ratio limit stops it long before the size limits would."""
    members = [m for m in _members(bundle_dir) if m[0] != "model.onnx"]
    tar = _tar(tmp_path / "bomb.tar.gz", [("model.onnx", b"\0" * (64 << 20)), *members])  # manifest not first
    assert tar.stat().st_size < 200_000
    with pytest.raises(BundleTrustError, match="compression ratio"):
        open_bundle(tar, extract_to=tmp_path / "d")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(("limits", "message"), [
    (Limits(max_file_bytes=100), "past the size limits"),
    (Limits(max_total_bytes=500), "past the size limits"),
    (Limits(max_files=2), "more than 2 files"),
])
def test_size_and_count_limits(bundle_dir: Path, limits: Limits, message: str):
    with pytest.raises(BundleTrustError, match=message):
        open_bundle(tarball_path(bundle_dir), limits=limits)


def test_declared_size_is_checked_against_the_manifest_before_writing(bundle_dir: Path, tmp_path: Path):
    members = [(n, d + b"more" if n == "model.onnx" else d) for n, d in _members(bundle_dir)]
    with pytest.raises(BundleTrustError, match="'model.onnx' is 1004 bytes, the manifest says 1000"):
        open_bundle(_tar(tmp_path / "s.tar.gz", members))


def test_garbage_and_truncated_archives(bundle_dir: Path, tmp_path: Path):
    before = _temp_bundles()
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    with pytest.raises(BundleTrustError, match="not a readable bundle archive"):
        open_bundle(junk)
    data = tarball_path(bundle_dir).read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleTrustError):
        open_bundle(cut)
    assert _temp_bundles() == before


# ------------------------------------------------------------------ signatures
@pytest.fixture
def keys(tmp_path: Path):
    k1, p1, id1 = new_keypair(tmp_path / "keys" / "release-2026")
    k2, p2, id2 = new_keypair(tmp_path / "keys" / "release-2027")
    return {"k1": load_private_key(k1), "k2": load_private_key(k2), "p1": p1, "p2": p2, "id1": id1, "id2": id2,
            "dir": tmp_path / "keys"}


def test_keypair_files(keys, tmp_path: Path):
    key_file = keys["dir"] / "release-2026.key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        new_keypair(keys["dir"] / "release-2026")
    with pytest.raises(ConfigError, match="not a readable public key"):
        load_public_keys([key_file])
    with pytest.raises(ConfigError, match="not a readable Ed25519 private key"):
        load_private_key(keys["p1"])


def test_signed_bundle_verifies_and_names_its_key(keys, tmp_path: Path):
    b = make_bundle(tmp_path / "s", signing_key=keys["k1"])
    trusted = load_public_keys([keys["p1"]])
    assert open_bundle(b, keys=trusted).signed_by == keys["id1"]
    assert open_bundle(tarball_path(b), keys=trusted).signed_by == keys["id1"]
    # rotation: a device trusting both keys (a folder of .pub files) accepts either
    both = load_public_keys([keys["dir"]])
    assert len(both) == 2 and open_bundle(b, keys=both).signed_by == keys["id1"]


def test_unsigned_untrusted_and_forged_are_refused(keys, tmp_path: Path):
    trusted = load_public_keys([keys["p1"]])
    unsigned = make_bundle(tmp_path / "u")
    with pytest.raises(BundleTrustError, match="bundle is not signed"):
        open_bundle(unsigned, keys=trusted)
    with pytest.raises(BundleTrustError, match="no trusted public key is configured"):
        open_bundle(unsigned, require_signature=True)
    other = make_bundle(tmp_path / "o", signing_key=keys["k2"])
    with pytest.raises(BundleTrustError, match=f"signed by {keys['id2']}, none of which this side trusts"):
        open_bundle(other, keys=trusted)
    # an attacker edits the manifest (and fixes its hashes) after signing: the signature no longer matches
    signed = make_bundle(tmp_path / "s", signing_key=keys["k1"])
    (signed / "model.onnx").write_bytes(b"evil model")
    sig = (signed / SIGNATURE).read_bytes()
    write_bundle(signed, make_manifest())
    (signed / SIGNATURE).write_bytes(sig)
    with pytest.raises(BundleTrustError, match="does not match the manifest"):
        open_bundle(signed, keys=trusted)
    # a garbage signature file
    (signed / SIGNATURE).write_text("{nope")
    with pytest.raises(BundleTrustError, match="unreadable signature file"):
        open_bundle(signed, keys=trusted)


def test_cosigning_for_rotation(keys, tmp_path: Path):
    from edgecore.signing import sign

    b = make_bundle(tmp_path / "c", signing_key=keys["k1"])
    manifest = (b / "manifest.json").read_bytes()
    (b / SIGNATURE).write_bytes(sign(manifest, keys["k2"], existing=(b / SIGNATURE).read_bytes()))
    sigs = json.loads((b / SIGNATURE).read_text())["signatures"]
    assert {s["key_id"] for s in sigs} == {keys["id1"], keys["id2"]}
    assert open_bundle(b, keys=load_public_keys([keys["p2"]])).signed_by == keys["id2"]
    write_tarball(b)
    assert open_bundle(tarball_path(b), keys=load_public_keys([keys["p1"]])).signed_by == keys["id1"]
