"""Bundles built from the tiny run: contents, trust checks, verify, CLI, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest

from edgecore.bundle import open_bundle
from edgecore.errors import (
    AccuracyGateError,
    BundleTrustError,
    TargetUnavailableError,
    UnknownTargetError,
)
from targets import load_runner
from toolchain.bundle import build_bundle, tarball_path
from toolchain.cli import main as cli
from toolchain.config import BuildConfig

MANIFEST_KEYS = {"schema_version", "model", "target", "precision", "toolchain_version", "created", "input", "output",
                 "artifact", "files", "metrics", "routing", "calibration", "lineage"}


def _last_json(capsys: pytest.CaptureFixture[str]) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_onnx_bundle_follows_the_contract(onnx_bundle: Path, tiny_run: Path) -> None:
    b = open_bundle(onnx_bundle)
    m = b.manifest.to_dict()
    assert MANIFEST_KEYS <= set(m)
    assert m["target"] == "onnx" and m["precision"] == "fp32" and m["calibration"] is None
    assert m["artifact"]["main"] == "model.onnx" and m["artifact"]["runtime"] == "onnxruntime"
    assert set(m["files"]) == {"model.onnx", "drift_reference.json", "routing_curve.json", "routing_curve.png"}
    met = m["metrics"]
    assert met["agreement"] >= 0.995 and met["accuracy"] >= met["reference_accuracy"] - 0.01
    assert met["size_bytes"] == m["files"]["model.onnx"]["size"] and met["params"] > 0
    r = m["routing"]
    assert r["measure"] == "max_prob" and r["temperature"] > 0 and r["offload_budget"] == 0.10
    assert 0 <= r["expected_offload"] <= 0.10 and r["expected_accuracy"] >= r["edge_accuracy"]
    # fitted on the calibration split: inputs no stage selected a checkpoint on
    assert r["fit_split"] == "calibration" and r["fit_inputs"] == 180 and r["fitted_on"].startswith("calibration")
    curve = json.loads((onnx_bundle / r["curve_file"]).read_text())
    assert curve["offload"][0] == 0.0 and curve["offload"][-1] == 1.0
    drift = b.drift_reference()
    assert drift["temperature"] == r["temperature"] and drift["measure"] == "max_prob"
    assert set(drift["features"]) == {"mean", "std"}
    assert m["lineage"]["student_sha256"] and m["lineage"]["run_dir"]
    assert m["input"]["shape"] == [None, 1, 8, 8] and len(m["output"]["labels"]) == 10
    # the tarball is the same bundle
    tb = open_bundle(tarball_path(onnx_bundle), extract_to=onnx_bundle.parent / "x")
    assert tb.manifest_sha256 == b.manifest_sha256
    # and the agent's runner on the preprocessed raw test data reproduces the build's accuracy
    from toolchain.rundir import RunDir

    s = RunDir(tiny_run).splits()
    logits = load_runner(b).run(b.input_spec.preprocess(s.test[0]))
    assert float((logits.argmax(1) == s.test[1]).mean()) == pytest.approx(met["accuracy"])


@pytest.mark.parametrize("target", ["onnx", "openvino", "tflite", "jetson", "coreml"])
def test_int8_bundles(target: str, bundle_factory: Callable[[str, str], Path], tiny_run: Path) -> None:
    b = open_bundle(bundle_factory(target, "int8"))
    m = b.manifest.to_dict()
    cal = m["calibration"]
    assert cal["method"] == "class-stratified" and cal["samples"] > 0
    from calibration.representative import build_representative_set
    from toolchain.bundle import reference_for

    # The provenance names this run's set: rebuilt from the run's data exactly as the build selects it
    # (not read back from the run dir, which a bundle taken from the fixture's cache never wrote to).
    ref = reference_for(tiny_run)
    expected = build_representative_set(inputs=ref.x_train, labels=ref.y_train, n=BuildConfig().calibration_samples)
    assert expected.sha256 == cal["dataset_sha256"] and len(expected.labels) == cal["samples"]
    if m["verify"]["status"] == "proxy":  # the target's runtime is absent here: its proxy ran, gated, marked as such
        assert target in ("jetson", "coreml") and m["verify"]["reason"] and m["verify"]["runtime"]
        assert m["metrics"]["accuracy"] is None and "passed" not in m["verify"]
        assert m["metrics"]["proxy_accuracy"] >= m["metrics"]["reference_accuracy"] - 0.01
    else:
        assert m["verify"]["status"] == "passed"
        assert m["metrics"]["accuracy"] >= m["metrics"]["reference_accuracy"] - 0.01


def test_verify_rerun_and_json(onnx_bundle: Path, tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["verify", str(onnx_bundle), "--run", str(tiny_run), "--json"]) == 0
    rep = _last_json(capsys)
    assert rep["status"] == "passed" and rep["agreement"] >= 0.995 and rep["n"] > 100


def test_verify_runs_the_proxy_where_runtime_is_missing(bundle_factory, tiny_run: Path, capsys) -> None:
    assert cli(["verify", str(bundle_factory("coreml", "fp16")), "--run", str(tiny_run), "--json"]) == 0
    rep = _last_json(capsys)
    assert rep["status"] == "proxy" and "macOS" in rep["reason"] and "passed" not in rep
    assert rep["proxy_for"] == "coremltools" and rep["runtime"].startswith("coremltools") and rep["n"] > 100
    assert "the package's own ML program" in rep["evaluates"]
    assert cli(["verify", str(bundle_factory("coreml", "fp16")), "--run", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    assert "PROXY" in out and "passed" not in out


def test_inspect_prints_and_json(onnx_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["inspect", str(onnx_bundle)]) == 0
    out = capsys.readouterr().out
    assert "routing" in out and "model.onnx" in out and "tiny-digits" in out
    assert cli(["inspect", str(tarball_path(onnx_bundle)), "--json"]) == 0
    rep = _last_json(capsys)
    assert rep["manifest"]["target"] == "onnx" and rep["bundle"] == str(tarball_path(onnx_bundle))


def test_inspect_tarball_titles_with_its_name(onnx_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Not with the temporary folder it was unpacked into (which is removed afterwards)."""
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("inspect-*"))
    assert cli(["inspect", str(tarball_path(onnx_bundle))]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.strip() == f"bundle {tarball_path(onnx_bundle)}"
    assert set(Path(tempfile.gettempdir()).glob("inspect-*")) == before


def test_targets_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["targets", "--json"]) == 0
    rows = {r["name"]: r for r in _last_json(capsys)}
    assert set(rows) >= {"onnx", "openvino", "tflite", "coreml", "jetson"}
    assert rows["onnx"]["available"] and not rows["jetson"]["available"] and "tensorrt" in rows["jetson"]["reason"]
    assert cli(["targets"]) == 0
    table = capsys.readouterr().out
    assert "jetson" in table
    if "[tensorrt]" in rows["jetson"]["reason"]:
        assert "[tensorrt]" in table  # the install hint survives rich's markup


# ---------------------------------------------------------------------- bad input
def _copy_run(tiny_run: Path, dst: Path) -> Path:
    shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns("bundles", "calibration"))
    return dst


def _scramble_onnx(path: Path) -> None:
    """A real but untrained-looking graph: every weight tensor's values shuffled."""
    m = onnx.load(str(path))
    rng = np.random.default_rng(0)
    for init in m.graph.initializer:
        a = onnx.numpy_helper.to_array(init)
        if a.ndim >= 2:
            init.CopyFrom(onnx.numpy_helper.from_array(rng.permutation(a.ravel()).reshape(a.shape), init.name))
    onnx.save(m, str(path))


def test_accuracy_gate_fails_and_leaves_nothing_shippable(tiny_run: Path, tmp_path: Path, capsys) -> None:
    run = _copy_run(tiny_run, tmp_path / "run")
    out = tmp_path / "b" / "onnx-fp32"
    build_bundle(run_dir=run, target="onnx", precision="fp32", out=out)  # a good bundle first
    assert (out / "manifest.json").exists()
    _scramble_onnx(run / "student.onnx")
    rc = cli(["build", "--run", str(run), "--target", "onnx", "--precision", "fp32", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "pt below the PyTorch reference" in err and "over by" in err
    assert not out.exists() and not tarball_path(out).exists()
    assert not [p for p in out.parent.iterdir()], "partial files left behind"
    with pytest.raises(AccuracyGateError):
        build_bundle(run_dir=run, target="onnx", precision="fp32", out=out)


def test_run_without_student_is_a_clear_error(tiny_run: Path, tmp_path: Path, capsys) -> None:
    run = _copy_run(tiny_run, tmp_path / "run")
    (run / "student.pt").unlink()
    rc = cli(["build", "--run", str(run), "--target", "onnx", "--precision", "fp32"])
    assert rc == 2 and "no student.pt" in capsys.readouterr().err
    assert not (run / "bundles").exists()
    rc = cli(["build", "--run", str(tmp_path / "nowhere"), "--target", "onnx", "--precision", "fp32"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "tpu", "--precision", "fp32"], "unknown target 'tpu'; available: onnx"),
    (["--target", "onnx", "--precision", "fp16"], "target 'onnx' does not support fp16; it supports fp32, int8"),
    (["--target", "tflite", "--precision", "int4"], "unknown precision 'int4'"),
])
def test_unknown_target_or_precision(args, message, tiny_run: Path, capsys) -> None:
    assert cli(["build", "--run", str(tiny_run), *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_tooling_names_the_package(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "litert_torch" else real(name, *a))
    with pytest.raises(TargetUnavailableError, match="litert-torch is not installed.*pip install"):
        build_bundle(run_dir=tiny_run, target="tflite", precision="fp32", out=tmp_path / "t")
    assert not (tmp_path / "t").exists()
    with pytest.raises(UnknownTargetError):
        build_bundle(run_dir=tiny_run, target="onnx", precision="fp16", out=tmp_path / "t")


def test_corrupt_bundles_are_refused(onnx_bundle: Path, tmp_path: Path, capsys) -> None:
    def fresh(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(onnx_bundle, d)
        return d

    d = fresh("flipped")
    data = bytearray((d / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "model.onnx").write_bytes(bytes(data))
    assert cli(["inspect", str(d)]) == 2
    assert "model.onnx: sha256 mismatch" in capsys.readouterr().err

    d = fresh("missing")
    (d / "drift_reference.json").unlink()
    assert cli(["verify", str(d)]) == 2
    assert "drift_reference.json: missing" in capsys.readouterr().err

    d = fresh("schema")
    m = json.loads((d / "manifest.json").read_text())
    m["schema_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    assert cli(["inspect", str(d)]) == 2
    assert "unknown bundle schema version 99" in capsys.readouterr().err

    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    with pytest.raises(BundleTrustError, match="not a readable bundle archive"):
        open_bundle(junk)


def test_build_all_fp16_with_json(tiny_run: Path, tmp_path: Path, capsys) -> None:
    """`--target all` builds every target that has the precision (here fp16: openvino, coreml, jetson)."""
    assert cli(["build", "--run", str(tiny_run), "--target", "all", "--precision", "fp16", "--out", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    rep = json.loads(out[-1])
    table = "\n".join(out[:-1])  # the table first, like every other command with --json
    assert "bundles" in table and "threshold" in table and all(t in table for t in ("openvino", "coreml", "jetson"))
    got = {(b["target"], b["precision"]) for b in rep["bundles"]}
    assert got == {("openvino", "fp16"), ("coreml", "fp16"), ("jetson", "fp16")}
    assert not rep["failed"]
    for t in ("openvino", "coreml", "jetson"):
        open_bundle(tmp_path / f"{t}-fp16")
        assert tarball_path(tmp_path / f"{t}-fp16").is_file()
    jet = json.loads((tmp_path / "jetson-fp16" / "trt_recipe.json").read_text())
    assert jet["builder_flags"] == ["FP16"] and jet["trtexec"].startswith("trtexec ")


def test_keys_build_sign_and_cosign(tiny_run: Path, tmp_path: Path, capsys) -> None:
    """`toolchain keys new`, `build --sign`, `sign` (co-signing for rotation), as users run them."""
    from edgecore.signing import load_public_keys

    assert cli(["keys", "new", str(tmp_path / "k" / "old"), "--json"]) == 0
    old = _last_json(capsys)
    assert cli(["keys", "new", str(tmp_path / "k" / "old")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert cli(["keys", "new", str(tmp_path / "k" / "new"), "--json"]) == 0
    new = _last_json(capsys)
    out = tmp_path / "b" / "onnx-fp32"
    assert cli(["build", "--run", str(tiny_run), "--target", "onnx", "--precision", "fp32", "--out", str(out),
                "--sign", old["private_key"], "--json"]) == 0
    assert _last_json(capsys)["signed"] is True
    assert open_bundle(tarball_path(out), keys=load_public_keys([old["public_key"]])).signed_by == old["key_id"]
    with pytest.raises(BundleTrustError, match="none of which this side trusts"):
        open_bundle(out, keys=load_public_keys([new["public_key"]]))
    assert cli(["sign", str(out), "--key", new["private_key"], "--json"]) == 0
    assert _last_json(capsys)["key_id"] == new["key_id"]
    for pub in (old, new):  # either key verifies the co-signed bundle and its rewritten tarball
        assert open_bundle(tarball_path(out), keys=load_public_keys([pub["public_key"]])).signed_by == pub["key_id"]
    assert cli(["sign", str(out), "--key", new["public_key"]]) == 2
    assert "not a readable Ed25519 private key" in capsys.readouterr().err
