"""Verify an artifact against the PyTorch reference on the test split.

Like Optimum's ``validate_model_outputs``: run the artifact, compare with the
reference, collect *every* problem and raise one error that lists them all.
Checks: top-1 accuracy against the fp32 PyTorch student minus the accuracy
budget (`AccuracyGateError`, saying by how much), and for fp32 artifacts the
top-1 agreement with PyTorch (at least 99.5%).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecore.errors import AccuracyGateError, BuildError
from targets.base import Precision, Runner

MIN_FP32_AGREEMENT = 0.995
MAX_LISTED_MISMATCHES = 20


def run_batched(runner: Runner, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([np.asarray(runner.run(x[i : i + batch_size])) for i in range(0, len(x), batch_size)])


@dataclass
class VerifyResult:
    accuracy: float
    reference_accuracy: float
    agreement: float
    max_abs_logit_diff: float
    n: int
    mismatches: list[dict[str, Any]] = field(default_factory=list)  # inputs where artifact and reference disagree
    mismatch_count: int = 0
    problems: list[str] = field(default_factory=list)
    gate_failed: bool = False

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def raise_if_failed(self, what: str) -> None:
        if self.passed:
            return
        cls = AccuracyGateError if self.gate_failed else BuildError
        raise cls(f"{what} failed verification: " + "; ".join(self.problems))


def compare(
    logits: np.ndarray, ref_logits: np.ndarray, y: np.ndarray, *, precision: Precision, budget_pt: float,
    labels: tuple[str, ...] | list[str] = (),
) -> VerifyResult:
    logits = np.asarray(logits, dtype=np.float64)
    ref_logits = np.asarray(ref_logits, dtype=np.float64)
    problems: list[str] = []
    if logits.shape != ref_logits.shape:
        return VerifyResult(0.0, float((ref_logits.argmax(1) == y).mean()), 0.0, float("inf"), len(y),
                            problems=[f"output shape {logits.shape} != reference {ref_logits.shape}"], gate_failed=True)
    pred, ref_pred = logits.argmax(1), ref_logits.argmax(1)
    acc, ref_acc = float((pred == y).mean()), float((ref_pred == y).mean())
    agree = float((pred == ref_pred).mean())
    diff = np.abs(logits - ref_logits).max(axis=1)
    bad = np.flatnonzero(pred != ref_pred)
    name = (lambda i: labels[i] if i < len(labels) else str(i)) if labels else str
    mismatches = [
        {"index": int(i), "label": name(int(y[i])), "artifact": name(int(pred[i])), "reference": name(int(ref_pred[i])),
         "max_abs_logit_diff": float(diff[i])}
        for i in bad[np.argsort(-diff[bad])][:MAX_LISTED_MISMATCHES]
    ]
    gate = False
    if not np.all(np.isfinite(logits)):
        problems.append("artifact produced non-finite logits")
        gate = True
    drop_pt = (ref_acc - acc) * 100.0
    if drop_pt > budget_pt + 1e-9:
        problems.append(
            f"accuracy {acc * 100:.2f}% is {drop_pt:.2f} pt below the PyTorch reference {ref_acc * 100:.2f}% "
            f"(budget {budget_pt:.2f} pt, over by {drop_pt - budget_pt:.2f} pt)"
        )
        gate = True
    if precision is Precision.FP32 and agree < MIN_FP32_AGREEMENT:
        problems.append(
            f"fp32 artifact agrees with PyTorch on {agree * 100:.2f}% of {len(y)} test inputs (< {MIN_FP32_AGREEMENT * 100:.1f}%); "
            f"{len(bad)} mismatches, max abs logit diff {float(diff.max()):.3g}; first: "
            + ", ".join(f"#{m['index']} {m['artifact']}!={m['reference']}" for m in mismatches[:5])
        )
    return VerifyResult(
        accuracy=acc, reference_accuracy=ref_acc, agreement=agree, max_abs_logit_diff=float(diff.max()) if len(diff) else 0.0,
        n=int(len(y)), mismatches=mismatches, mismatch_count=int(len(bad)), problems=problems, gate_failed=gate,
    )


def verify_bundle(bundle: Path | str, *, run_dir: Path | str | None = None, budget_pt: float | None = None,
                  threads: int | None = None) -> dict[str, Any]:
    """Re-run a bundle's artifact on its run's test split; raises on failure, returns the report.

    The run folder defaults to the one recorded in the manifest's lineage.
    A target whose runtime is absent here is reported as skipped, with why.
    """
    from edgecore.bundle import open_bundle
    from edgecore.errors import ModelError
    from targets import get_target, parse_precision
    from toolchain.reference import reference_for

    b = open_bundle(bundle)
    m = b.manifest
    target = get_target(m.target)
    precision = parse_precision(target, m.precision.value)
    run_path = run_dir or m.lineage.get("run_dir")
    if not run_path:
        raise ModelError(f"{b.root}: manifest names no run folder; pass --run DIR")
    report: dict[str, Any] = {"bundle": str(b.root), "target": target.name, "precision": precision.value,
                              "manifest_sha256": b.manifest_sha256}
    ok, why = target.available()
    if not ok:
        report.update(status="skipped", reason=why)
        return report
    ref = reference_for(Path(run_path))
    if budget_pt is None:
        budget_pt = float(m.metrics.get("accuracy_budget_pt", 1.0))
    logits = run_batched(target.load(b.root, m.artifact, m.input, threads=threads), ref.x_test)
    res = compare(logits, ref.student_test, ref.y_test, precision=precision, budget_pt=budget_pt, labels=ref.labels)
    report.update(status="passed" if res.passed else "failed", **res.to_dict())
    res.raise_if_failed(f"bundle {b.root}")
    return report
