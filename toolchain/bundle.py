"""``toolchain build``: one run + one target/precision -> a verified deployment bundle.

Steps: calibration set (int8), target build into a temporary directory,
verify against the PyTorch student on the test split (when the target's runtime
is here), temperature scaling and routing threshold on the validation split,
drift reference, manifest with every file's hash; then the directory is
renamed into place and ``BUNDLE.tar.gz`` written beside it. Any failure, the
accuracy gate included, leaves nothing at the destination that looks shippable
(`edgecore.fsutil.atomic_dir`).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecore.bundle import DRIFT_REFERENCE, MANIFEST, SCHEMA_VERSION, file_entries
from edgecore.errors import TargetUnavailableError
from edgecore.fsutil import atomic_dir, atomic_write_json
from targets import Precision, get_target, parse_precision
from targets.base import InputSpec
from toolchain import __version__
from toolchain.config import BuildConfig

log = logging.getLogger(__name__)


@dataclass
class Reference:
    """Everything a build compares with, computed once per run (PyTorch side)."""

    run_dir: Path
    input_spec: InputSpec
    labels: tuple[str, ...]
    x_train: np.ndarray  # normalised
    y_train: np.ndarray
    raw_val: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    student_val: np.ndarray
    student_test: np.ndarray
    teacher_val: np.ndarray | None  # the cloud model's logits (None: no teacher in the run)
    macs: int | None
    params: int | None
    lineage: dict[str, Any]


_REFERENCES: dict[tuple[str, float, float], Reference] = {}


def _torch_logits(model: Any, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size]))).float().numpy())
    return np.concatenate(out)


def reference_for(run_dir: Path) -> Reference:
    """The run's splits and PyTorch logits (cached per process while the checkpoints are unchanged)."""
    from toolchain.rundir import RunDir

    run = RunDir(run_dir)
    student_p = run.require(RunDir.STUDENT, hint="run `toolchain compress` first")
    teacher_p = run.path / RunDir.TEACHER
    key = (str(run.path.resolve()), student_p.stat().st_mtime, teacher_p.stat().st_mtime if teacher_p.exists() else 0.0)
    if key in _REFERENCES:
        return _REFERENCES[key]
    splits = run.splits()
    spec = splits.input_spec
    student = run.load_student()
    x_train, x_val, x_test = (spec.preprocess(s[0]) for s in (splits.train, splits.val, splits.test))
    teacher_val = _torch_logits(run.load_teacher(), x_val) if teacher_p.exists() else None
    macs = params = None
    try:
        from toolchain.models import count_macs, count_params

        params = count_params(student)
        macs = count_macs(student, spec.sample_shape)
    except Exception as e:  # counting is informative only; never fail a build on it
        log.debug("MAC/param count failed: %s", e)
    lineage = dict(run.lineage())
    lineage["run_dir"] = str(run.path.resolve())
    ref = Reference(
        run_dir=run.path, input_spec=spec, labels=tuple(splits.labels), x_train=x_train, y_train=splits.train[1],
        raw_val=splits.val[0], x_val=x_val, y_val=splits.val[1], x_test=x_test, y_test=splits.test[1],
        student_val=_torch_logits(student, x_val), student_test=_torch_logits(student, x_test),
        teacher_val=teacher_val, macs=macs, params=params, lineage=lineage,
    )
    _REFERENCES.clear()
    _REFERENCES[key] = ref
    return ref


def default_out(run_dir: Path, target: str, precision: str) -> Path:
    return Path(run_dir) / "bundles" / f"{target}-{precision}"


def tarball_path(bundle_dir: Path) -> Path:
    return bundle_dir.with_name(bundle_dir.name + ".tar.gz")


def write_tarball(bundle_dir: Path) -> Path:
    """``BUNDLE.tar.gz`` beside the directory, written to a temp file and renamed."""
    dest = tarball_path(bundle_dir)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz") as tf:
            tf.add(bundle_dir, arcname=bundle_dir.name)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _remove_stale(out: Path) -> None:
    """A failed build must not leave an older bundle at the same place looking like its result."""
    import shutil

    if out.exists():
        shutil.rmtree(out, ignore_errors=True)
    tarball_path(out).unlink(missing_ok=True)


def build_bundle(
    *, run_dir: Path | str, target: str, precision: str, out: Path | str | None = None,
    cfg: BuildConfig = BuildConfig(), model_version: str | None = None,
) -> dict[str, Any]:
    """Build, verify and write one bundle; returns the build report (also in the manifest)."""
    from calibration.confidence import calibrate, confidence
    from calibration.drift_reference import drift_reference
    from calibration.representative import build_representative_set
    from calibration.routing import choose_threshold, write_curve
    from toolchain.rundir import RunDir
    from toolchain.verify import compare, run_batched

    t = get_target(target)
    p = parse_precision(t, precision)
    ok, why = t.build_available()
    if not ok:
        raise TargetUnavailableError(f"cannot build {t.name} here: {why}")
    run = RunDir(run_dir)
    source = run.model_source()
    ref = reference_for(run.path)
    out = Path(out) if out is not None else default_out(run.path, t.name, p.value)

    rep = None
    if p is Precision.INT8:
        rep = build_representative_set(
            inputs=ref.x_train, labels=ref.y_train, n=cfg.calibration_samples,
            path=run.path / "calibration" / f"representative-{cfg.calibration_samples}.npz",
        )
    can_run, run_why = t.available()
    t0 = time.perf_counter()
    try:
        with atomic_dir(out) as tmp:
            log.info("building %s %s from %s", t.name, p.value, run.path)
            artifact = t.build(source, p, rep, tmp)
            build_s = time.perf_counter() - t0
            manifest: dict[str, Any] = {
                "schema_version": SCHEMA_VERSION,
                "model": {"name": source.name, "version": model_version or (ref.lineage.get("student_sha256") or "dev")[:12]},
                "target": t.name,
                "precision": p.value,
                "toolchain_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "input": ref.input_spec.to_dict(),
                "output": {"name": "logits", "labels": list(ref.labels)},
                "artifact": {"main": artifact.main, "runtime": artifact.runtime, "runtime_version": t.runtime_version(),
                             "details": artifact.details},
            }
            size = sum(e["size"] for e in file_entries(tmp, artifact.files).values())
            verify: dict[str, Any]
            if can_run and cfg.verify:
                log.info("verifying %s %s on %d test inputs", t.name, p.value, len(ref.y_test))
                runner = t.load(tmp, manifest)
                res = compare(run_batched(runner, ref.x_test), ref.student_test, ref.y_test, precision=p,
                              budget_pt=cfg.accuracy_budget_pt, labels=ref.labels)
                val_logits = run_batched(runner, ref.x_val)
                verify = {"status": "passed" if res.passed else "failed", **res.to_dict()}
                res.raise_if_failed(f"{t.name} {p.value} build")
                metrics = {"accuracy": res.accuracy, "reference_accuracy": res.reference_accuracy,
                           "agreement": res.agreement, "max_abs_logit_diff": res.max_abs_logit_diff}
                conf_source = "artifact"
            else:
                reason = run_why if not can_run else "disabled by build.verify = false"
                verify = {"status": "skipped", "reason": reason}
                val_logits = ref.student_val
                metrics = {"accuracy": None, "reference_accuracy": float((ref.student_test.argmax(1) == ref.y_test).mean()),
                           "agreement": None, "max_abs_logit_diff": None}
                conf_source = "pytorch reference (artifact not runnable here)"
            metrics.update(size_bytes=int(size), macs=ref.macs, params=ref.params,
                           accuracy_budget_pt=cfg.accuracy_budget_pt, build_seconds=round(build_s, 3))

            fit = calibrate(val_logits, ref.y_val)
            conf = confidence(val_logits, measure=cfg.confidence.value, temperature=fit.temperature)
            edge_ok = val_logits.argmax(1) == ref.y_val
            cloud_ok = (ref.teacher_val.argmax(1) == ref.y_val) if ref.teacher_val is not None else np.ones_like(edge_ok)
            choice = choose_threshold(conf, edge_ok, cloud_ok, offload_budget=cfg.offload_budget)
            curve_json, curve_png = write_curve(tmp, conf, edge_ok, cloud_ok, choice=choice,
                                                title=f"{source.name} {t.name} {p.value}: accuracy vs offload")
            atomic_write_json(tmp / DRIFT_REFERENCE, drift_reference(
                raw=ref.raw_val, conf=conf, measure=cfg.confidence.value, temperature=fit.temperature))
            manifest["metrics"] = metrics
            manifest["routing"] = {
                "measure": cfg.confidence.value, "temperature": fit.temperature, "threshold": choice.threshold,
                "offload_budget": cfg.offload_budget, "expected_accuracy": choice.expected_accuracy,
                "expected_offload": choice.expected_offload, "edge_accuracy": choice.edge_accuracy,
                "cloud_accuracy": choice.cloud_accuracy, "curve_file": curve_json, "curve_plot": curve_png,
                "ece_before": fit.ece_before, "ece_after": fit.ece_after, "fitted_on": f"validation split, {conf_source}",
            }
            manifest["calibration"] = rep.provenance() if rep is not None else None
            manifest["lineage"] = ref.lineage
            manifest["verify"] = verify
            manifest["files"] = file_entries(tmp, [*artifact.files, DRIFT_REFERENCE, curve_json, curve_png])
            atomic_write_json(tmp / MANIFEST, manifest)
    except BaseException:
        _remove_stale(out)
        raise
    tar = write_tarball(out)
    log.info("wrote %s (%s)", out, tar.name)
    return {
        "bundle": str(out), "tarball": str(tar), "target": t.name, "precision": p.value,
        "metrics": manifest["metrics"], "verify": {k: v for k, v in verify.items() if k != "mismatches"},
        "routing": manifest["routing"], "calibration": manifest["calibration"], "artifact": artifact.details,
    }
