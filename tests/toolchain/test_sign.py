"""`toolchain keys new` and `toolchain sign` as users run them: nothing is signed that does not check out."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from edgecore.bundle import SIGNATURE, open_bundle, tarball_path
from edgecore.signing import load_private_key, load_public_keys, sign
from tests.edgecore.conftest import make_bundle
from toolchain.cli import main as cli


@pytest.fixture
def keys(tmp_path: Path, capsys) -> dict[str, dict[str, str]]:
    out = {}
    for name in ("old", "new"):
        assert cli(["keys", "new", str(tmp_path / "k" / name), "--json"]) == 0
        out[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return out


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


def test_keys_new_writes_the_private_key_owner_only(keys) -> None:
    for k in keys.values():
        assert Path(k["private_key"]).stat().st_mode & 0o777 == 0o600


@pytest.mark.skipif(os.name != "posix", reason="mode bits are POSIX")
def test_a_private_key_others_can_read_is_refused(keys, tmp_path: Path, capsys) -> None:
    b = make_bundle(tmp_path / "b")
    key = Path(keys["new"]["private_key"])
    key.chmod(0o644)
    assert cli(["sign", str(b), "--key", str(key)]) == 2
    err = _err_line(capsys)
    assert "accessible by other users (mode 0644)" in err and "chmod 600" in err
    assert not (b / SIGNATURE).exists()
    key.chmod(0o600)
    assert cli(["sign", str(b), "--key", str(key)]) == 0


def test_sign_refuses_a_bundle_whose_files_changed(keys, tmp_path: Path, capsys) -> None:
    b = make_bundle(tmp_path / "b")
    (b / "model.onnx").write_bytes(b"swapped")
    assert cli(["sign", str(b), "--key", keys["new"]["private_key"]]) == 2
    assert "model.onnx: size" in _err_line(capsys)
    assert not (b / SIGNATURE).exists()


def test_sign_refuses_to_add_beside_a_signature_that_does_not_verify(keys, tmp_path: Path, capsys) -> None:
    old = load_private_key(keys["old"]["private_key"])
    b = make_bundle(tmp_path / "b", signing_key=old)
    # the old signature was made over another manifest (say, edited after signing)
    forged = sign(b'{"not": "this manifest"}', old)
    (b / SIGNATURE).write_bytes(forged)
    args = ["sign", str(b), "--key", keys["new"]["private_key"], "--trust-key", keys["old"]["public_key"]]
    assert cli(args) == 2
    err = _err_line(capsys)
    assert f"signature by key {keys['old']['key_id']} does not match the manifest" in err, err
    assert (b / SIGNATURE).read_bytes() == forged  # nothing added


def test_sign_refuses_to_add_beside_a_malformed_signature(keys, tmp_path: Path, capsys) -> None:
    b = make_bundle(tmp_path / "b", signing_key=load_private_key(keys["old"]["private_key"]))
    doc = json.loads((b / SIGNATURE).read_text())
    doc["signatures"][0]["sig"] = base64.b64encode(b"short").decode()
    (b / SIGNATURE).write_text(json.dumps(doc))
    assert cli(["sign", str(b), "--key", keys["new"]["private_key"]]) == 2  # no --trust-key: form still checked
    assert "is malformed" in _err_line(capsys)


def test_cosigning_checks_what_it_can_and_says_what_it_could_not(keys, tmp_path: Path, capsys) -> None:
    b = make_bundle(tmp_path / "b", signing_key=load_private_key(keys["old"]["private_key"]))
    assert cli(["sign", str(b), "--key", keys["new"]["private_key"]]) == 0
    assert f"kept signatures by {keys['old']['key_id']} unchecked" in capsys.readouterr().out
    assert cli(["sign", str(b), "--key", keys["new"]["private_key"], "--trust-key", keys["old"]["public_key"],
                "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["unchecked_signatures"] == []
    for k in keys.values():
        assert open_bundle(tarball_path(b), keys=load_public_keys([k["public_key"]])).signed_by == k["key_id"]


def test_an_oversized_signature_file_is_refused(keys, tmp_path: Path, capsys) -> None:
    from edgecore.bundle import MAX_SIGNATURE_BYTES, write_tarball
    from edgecore.errors import BundleTrustError

    b = make_bundle(tmp_path / "b", signing_key=load_private_key(keys["old"]["private_key"]))
    doc = json.loads((b / SIGNATURE).read_text())
    doc["padding"] = "x" * (MAX_SIGNATURE_BYTES + 1)
    (b / SIGNATURE).write_text(json.dumps(doc))
    trusted = load_public_keys([keys["old"]["public_key"]])
    for where in (b, write_tarball(b)):
        with pytest.raises(BundleTrustError, match=f"more than the {MAX_SIGNATURE_BYTES} a signature file may hold"):
            open_bundle(where, keys=trusted)
    with pytest.raises(BundleTrustError, match="a signature file may hold"):
        open_bundle(b)  # even where no signature is required
    assert cli(["sign", str(b), "--key", keys["new"]["private_key"]]) == 2
    assert "a signature file may hold" in _err_line(capsys)
