"""``toolchain build``: one run + one target/precision -> a verified, optionally signed deployment bundle.

Steps: calibration set (int8), target build into a temporary directory,
verify against the PyTorch student on the test split (on the target's runtime
when it is here, else on the target's proxy: `toolchain.verify.evaluate`), temperature scaling and routing threshold on the validation split,
drift reference, then the typed manifest through the one writer
(`edgecore.bundle.write_bundle`: every file hashed, signed with ``--sign``);
then the directory is renamed into place and ``BUNDLE.tar.gz`` written beside
it. Any failure, the accuracy gate included, leaves nothing at the destination
that looks shippable (`edgecore.fsutil.atomic_dir`).
"""

from __future__ import annotations

import datetime as _dt
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, TypeVar

import numpy as np

from edgecore.bundle import (
    DRIFT_REFERENCE,
    file_entries,
    tarball_path,
    write_bundle,
    write_tarball,
)
from edgecore.errors import ConfigError, EdgeError, TargetUnavailableError
from edgecore.fsutil import atomic_dir, atomic_write_json
from edgecore.manifest import ArtifactInfo, Manifest, ModelInfo, OutputSpec, Routing
from edgecore.spec import InputSpec, Precision
from edgecore.tasks import TaskSpec
from targets import Artifact, ModelSource, Target, get_target, parse_precision
from toolchain import __version__
from toolchain.config import BuildConfig
from toolchain.reference import Reference, reference_for

if TYPE_CHECKING:  # pragma: no cover
    from edgecore.representative import RepresentativeSet

log = logging.getLogger(__name__)
T = TypeVar("T")
MIN_THRESHOLD_ROWS = 30  # a device refresh's own held-out inputs place the routing threshold from this many

__all__ = ["build_bundle", "build_each", "default_out", "manifest_for", "representative_for", "tarball_path", "write_tarball", "reference_for"]


def build_each(
    todo: Iterable[tuple[str, str]], build_one: Callable[[str, str], T], *,
    on_step: Callable[[str, str], None] | None = None,
) -> tuple[dict[tuple[str, str], T], list[dict[str, str]]]:
    """Run ``build_one(target, precision)`` for each pair; a failing build (an `EdgeError`) is collected,
    not raised, so one bad target does not cost the others. Returns (results by pair, failures).

    The one "build these bundles, collect failures" loop: `toolchain build --target all`, the demo and
    `hw-bench models` use it.
    """
    done: dict[tuple[str, str], T] = {}
    failed: list[dict[str, str]] = []
    for target, precision in todo:
        if on_step is not None:
            on_step(target, precision)
        try:
            done[(target, precision)] = build_one(target, precision)
        except EdgeError as e:
            log.warning("%s %s not built: %s", target, precision, e)
            failed.append({"target": target, "precision": precision, "error": f"{type(e).__name__}: {e}"})
    return done, failed


def default_out(run_dir: Path, target: str, precision: str) -> Path:
    return Path(run_dir) / "bundles" / f"{target}-{precision}"


def _remove_stale(out: Path) -> None:
    """A failed build must not leave an older bundle at the same place looking like its result."""
    if out.exists():
        shutil.rmtree(out, ignore_errors=True)
    tarball_path(out).unlink(missing_ok=True)


@dataclass
class _Verified:
    verify: dict[str, Any]
    metrics: dict[str, Any]
    fit_out: np.ndarray  # the artifact's outputs on the routing fit split
    conf_source: str


def _verify(t: Target, p: Precision, tmp: Path, art: ArtifactInfo, ref: Reference, cfg: BuildConfig,
            source: ModelSource) -> _Verified:
    """Run the artifact (or, without its runtime, the target's proxy) on the test split and gate it."""
    from toolchain.verify import evaluate

    log.info("verifying %s %s on %d test inputs", t.name, p.value, len(ref.y_test))
    ev = evaluate(t, tmp, art, ref.input_spec, x_test=ref.x_test, y_test=ref.y_test, ref_test=ref.student_test,
                  x_fit=ref.x_fit, precision=p, budget_pt=cfg.accuracy_budget_pt, labels=ref.labels, source=source,
                  enabled=cfg.verify, task=ref.task)
    val = ev.fit_out if ev.fit_out is not None else ref.student_fit
    return _Verified(ev.verify, ev.metrics, val, ev.conf_source)


_SPLIT_WORDS = {
    "calibration": "calibration split (no stage selected a checkpoint on it)",
    "validation": "validation split (selection-biased: the run has no calibration split, or a device refresh)",
}


def _routing(tmp: Path, ref: Reference, cfg: BuildConfig, fit_out: np.ndarray, conf_source: str,
             title: str) -> Routing:
    """Temperature, threshold for the offload budget, the curve files and the drift reference.

    All fitted on ``ref``'s fit split (the calibration split: inputs no stage selected a checkpoint on, so the
    student does not look better there than it is); ``fit_out`` is the artifact's outputs on it.
    """
    from calibration.drift_reference import drift_reference
    from calibration.routing import choose_threshold, write_curve

    task = ref.task
    fit = task.calibrate(fit_out, ref.y_fit)
    conf = task.contract.confidence(fit_out, measure=cfg.confidence.value, temperature=fit.temperature)
    edge_ok = task.contract.quality(fit_out, ref.y_fit)
    cloud_ok = task.contract.quality(ref.teacher_fit, ref.y_fit) if ref.teacher_fit is not None else np.ones_like(edge_ok)
    # A refresh for one device: the threshold spends the offload budget on what that device now sees (its
    # collected held-out inputs), as the drift reference describes it; the temperature is fitted on all of it.
    seen = ref.drift_rows or slice(None)
    own = ref.drift_rows is not None and len(ref.y_fit[seen]) >= MIN_THRESHOLD_ROWS  # else too few: all
    rows = seen if own else slice(None)
    choice = choose_threshold(conf[rows], edge_ok[rows], cloud_ok[rows], offload_budget=cfg.offload_budget,
                              split=ref.fit_split)
    curve_json, curve_png = write_curve(tmp, conf[rows], edge_ok[rows], cloud_ok[rows], choice=choice, title=title)
    contract = task.contract
    outputs = None
    if contract.OUTPUT_STATS:  # what the device's telemetry compares besides its inputs (a detector's objects)
        preds, _ = contract.decide(fit_out[seen], measure=cfg.confidence.value, temperature=fit.temperature,
                                   labels=ref.labels)
        stats = np.array([contract.output_stats(p) for p in preds], np.float64).reshape(len(preds), -1)
        outputs = {name: stats[:, i] for i, name in enumerate(contract.OUTPUT_STATS)}
    atomic_write_json(tmp / DRIFT_REFERENCE, drift_reference(
        raw=ref.raw_fit[seen], conf=conf[seen], measure=cfg.confidence.value, temperature=fit.temperature,
        outputs=outputs))
    return Routing(
        measure=cfg.confidence.value, temperature=fit.temperature, threshold=choice.threshold,
        offload_budget=cfg.offload_budget,
        info={"expected_accuracy": choice.expected_accuracy, "expected_offload": choice.expected_offload,
              "edge_accuracy": choice.edge_accuracy, "cloud_accuracy": choice.cloud_accuracy,
              "curve_file": curve_json, "curve_plot": curve_png, "ece_before": fit.ece_before,
              "ece_after": fit.ece_after, "fitted_on": f"{_SPLIT_WORDS[ref.fit_split]}, {conf_source}" + (
                  ", threshold on the device's collected held-out inputs" if own else ""),
              "fit_split": ref.fit_split, "fit_inputs": int(len(ref.y_fit)),
              "rule": choice.rule, "rule_reason": choice.reason or None,
              "temperature_fitted": fit.fitted, "temperature_bounds": list(fit.bounds)},
    )


def manifest_for(
    artifact: Artifact, *, name: str, version: str, input_spec: InputSpec, labels: Sequence[str],
    metrics: dict[str, Any], calibration: RepresentativeSet | None = None, routing: Routing | None = None,
    drift_reference: str | None = None, lineage: dict[str, Any] | None = None, verify: dict[str, Any] | None = None,
    task: TaskSpec | None = None, release: int | None = None,
) -> Manifest:
    """The one place a built artifact becomes a manifest: `build_bundle` and ``hw-bench models`` write theirs
    through it (with `edgecore.bundle.write_bundle`, which adds the files' hashes and the signature)."""
    return Manifest(
        model=ModelInfo(name=name, version=version, release=release), target=artifact.target,
        precision=artifact.precision,
        input=input_spec, output=OutputSpec(name="logits", labels=tuple(labels)),
        artifact=artifact.info(get_target(artifact.target).runtime_version()), toolchain_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), routing=routing,
        drift_reference=drift_reference, metrics=metrics,
        calibration=calibration.provenance() if calibration is not None else None, lineage=lineage or {},
        verify=verify or {}, task=task or TaskSpec(),
    )


def representative_for(run_dir: Path, ref: Reference, cfg: BuildConfig = BuildConfig()) -> "RepresentativeSet":
    """The run's int8 calibration set (stored in the run, reused by every build and by ``hw-bench peers``)."""
    from calibration.representative import build_representative_set

    return build_representative_set(
        inputs=ref.x_train, labels=ref.task.representative_labels(ref.y_train), n=cfg.calibration_samples,
        path=Path(run_dir) / "calibration" / f"representative-{cfg.calibration_samples}.npz",
    )


def build_bundle(
    *, run_dir: Path | str, target: str, precision: str, out: Path | str | None = None,
    cfg: BuildConfig = BuildConfig(), model_version: str | None = None, signing_key: Any = None,
    release: int | None = None,
) -> dict[str, Any]:
    """Build, verify and write one bundle; returns the build report (also in the manifest).

    ``signing_key``: an Ed25519 private key (`edgecore.signing.load_private_key`) to sign the manifest.
    ``release``: the bundle's release number in its model line (`ModelInfo.release`); default: the build's time
    in whole seconds since 1970 (later builds of a line are higher on any one build machine's clock).
    """
    from toolchain.rundir import RunDir

    if release is not None and (isinstance(release, bool) or not 0 <= int(release) < 2**63):
        raise ConfigError(f"release: a bundle's release number is an integer >= 0, got {release!r}")
    t = get_target(target)
    p = parse_precision(t, precision)
    ok, why = t.build_available()
    if not ok:
        raise TargetUnavailableError(f"cannot build {t.name} here: {why}")
    run = RunDir(run_dir)
    source = run.model_source()
    ref = reference_for(run.path)
    out = Path(out) if out is not None else default_out(run.path, t.name, p.value)
    rep = representative_for(run.path, ref, cfg) if p is Precision.INT8 else None
    t0 = time.perf_counter()
    try:
        with atomic_dir(out) as tmp:
            log.info("building %s %s from %s", t.name, p.value, run.path)
            artifact = t.build(source, p, rep, tmp)
            build_s = time.perf_counter() - t0
            art = artifact.info(t.runtime_version())
            size = sum(e.size for e in file_entries(tmp, artifact.files).values())
            ver = _verify(t, p, tmp, art, ref, cfg, source)
            ver.metrics.update(size_bytes=int(size), macs=ref.macs, params=ref.params,
                             accuracy_budget_pt=cfg.accuracy_budget_pt, build_seconds=round(build_s, 3))
            routing = _routing(tmp, ref, cfg, ver.fit_out, ver.conf_source,
                               title=f"{source.name} {t.name} {p.value}: accuracy vs offload")
            manifest = write_bundle(tmp, manifest_for(
                artifact, name=source.name,
                version=model_version or (ref.lineage.get("student_sha256") or "dev")[:12],
                input_spec=ref.input_spec, labels=ref.labels, metrics=ver.metrics, calibration=rep, routing=routing,
                drift_reference=DRIFT_REFERENCE, lineage=ref.lineage, verify=ver.verify, task=ref.task.contract.spec,
                release=int(time.time()) if release is None else int(release),
            ), signing_key=signing_key)
    except BaseException:
        _remove_stale(out)
        raise
    tar = write_tarball(out)
    log.info("wrote %s (%s)%s", out, tar.name, " signed" if signing_key is not None else "")
    return {
        "bundle": str(out), "tarball": str(tar), "target": t.name, "precision": p.value,
        "metrics": manifest.metrics, "verify": {k: v for k, v in ver.verify.items() if k != "mismatches"},
        "routing": manifest.routing.to_dict() if manifest.routing else None, "calibration": manifest.calibration,
        "artifact": artifact.details, "signed": signing_key is not None,
    }
