"""Verify an artifact against the PyTorch reference on the test split.

Like Optimum's ``validate_model_outputs``: run the artifact, compare with the
reference, collect *every* problem and raise one error that lists them all.
Checks: top-1 accuracy against the fp32 PyTorch student minus the accuracy
budget (`AccuracyGateError`, saying by how much), and for fp32 artifacts the
top-1 agreement with PyTorch (at least 99.5%).

`evaluate` is the one place a build or a re-verify runs an artifact. Where the
target's runtime is here it runs the artifact for real (``status`` "passed").
Where it is not, a target may offer a *proxy* (`Target.proxy`: Jetson's QDQ
graph on ONNX Runtime CPU, the Core ML package's ML program executed in
PyTorch): the same gate applies to it and ``status`` says "proxy", with the
runtime used and what it does not model; a proxy that cannot look inside the
artifact (`Proxy.unverified`) says "unverified" instead. Nothing reads
"passed" that did not run on the target's runtime. With the runtime here, the proxy figure is kept beside the
real one (``verify.proxy``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecore.errors import AccuracyGateError, BuildError
from edgecore.manifest import ArtifactInfo
from edgecore.spec import InputSpec, Precision
from targets.base import ModelSource, Runner, Target
from toolchain.tasks import TrainTask, get_train_task


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
    logits: np.ndarray, ref_logits: np.ndarray, y: Any, *, precision: Precision, budget_pt: float,
    labels: tuple[str, ...] | list[str] = (), task: TrainTask | None = None,
) -> VerifyResult:
    """The build gate of ``task`` (default: classification): an artifact's outputs against the reference's."""
    return (task or get_train_task()).compare(logits, ref_logits, y, precision=precision, budget_pt=budget_pt,
                                              labels=labels)


@dataclass
class Evaluation:
    """What a build records from running (or proxy-running) its artifact."""

    verify: dict[str, Any]  # the manifest's verify block
    metrics: dict[str, Any]  # accuracy, reference_accuracy, agreement, max_abs_logit_diff, proxy_*
    fit_out: np.ndarray | None  # the artifact's (or proxy's) outputs on x_fit (routing); None: neither ran
    conf_source: str  # what the routing threshold is fitted on


def _proxy_block(target: Target, bundle_dir: Path, artifact: ArtifactInfo, source: ModelSource | None,
                 x: np.ndarray, ref_logits: np.ndarray, y: Any, *, precision: Precision, budget_pt: float,
                 labels: Any, task: TrainTask) -> tuple[dict[str, Any], VerifyResult, Runner] | None:
    proxy = target.proxy(bundle_dir, artifact, precision, source)
    if proxy is None:
        return None
    res = task.compare(run_batched(proxy.runner, x), ref_logits, y, precision=precision, budget_pt=budget_pt,
                       labels=labels)
    block = {k: v for k, v in res.to_dict().items() if k != "passed"}  # "passed" is for the target's runtime only
    # a proxy that cannot look inside the artifact never says "proxy": it evaluated a reproduction
    status = "unverified" if proxy.unverified else "proxy"
    block.update(status=status if res.passed else "failed", proxy_for=target.runtime, within_budget=res.passed,
                 **proxy.describe())
    return block, res, proxy.runner


def evaluate(
    target: Target, bundle_dir: Path, artifact: ArtifactInfo, input_spec: InputSpec, *, x_test: np.ndarray, y_test: Any,
    ref_test: np.ndarray, x_fit: np.ndarray | None = None, precision: Precision, budget_pt: float,
    labels: Any = (), source: ModelSource | None = None, threads: int | None = None, enabled: bool = True,
    task: TrainTask | None = None,
) -> Evaluation:
    """Run the artifact on the test split (for real, else on the target's proxy), gate it; raises on failure."""
    task = task or get_train_task()
    ref_acc = task.metric(ref_test, y_test)
    can_run, why = target.available()
    if not enabled:
        can_run, why = False, "disabled by build.verify = false"
    args = {"precision": precision, "budget_pt": budget_pt, "labels": labels, "task": task}
    proxied = _proxy_block(target, bundle_dir, artifact, source, x_test, ref_test, y_test, **args) if enabled else None
    metrics: dict[str, Any] = {"accuracy": None, "reference_accuracy": ref_acc, "agreement": None, "max_abs_logit_diff": None}
    if proxied:
        block, pres, prunner = proxied
        metrics.update(proxy_accuracy=pres.accuracy, proxy_agreement=pres.agreement, proxy_runtime=block["runtime"])
    if can_run:
        runner = target.load(bundle_dir, artifact, input_spec, threads=threads)
        res = compare(run_batched(runner, x_test), ref_test, y_test, **args)
        verify = {"status": "passed" if res.passed else "failed", "runtime": f"{target.runtime} {target.runtime_version()}",
                  **res.to_dict()}
        if proxied:
            verify["proxy"] = {k: v for k, v in block.items() if k != "mismatches"}
        res.raise_if_failed(f"{target.name} {precision.value} build")
        metrics.update(accuracy=res.accuracy, agreement=res.agreement, max_abs_logit_diff=res.max_abs_logit_diff)
        val = run_batched(runner, x_fit) if x_fit is not None else None
        return Evaluation(verify, metrics, val, "artifact")
    if proxied:
        verify = {**block, "reason": why}
        pres.raise_if_failed(f"{target.name} {precision.value} build (proxy: {block['runtime']}; {target.runtime} absent)")
        val = run_batched(prunner, x_fit) if x_fit is not None else None
        return Evaluation(verify, metrics, val, f"proxy ({block['runtime']})")
    return Evaluation({"status": "skipped", "reason": why}, metrics, None, "pytorch reference (artifact not runnable here)")


def shown_accuracy(metrics: dict[str, Any]) -> tuple[float | None, float | None, bool]:
    """(accuracy, agreement, is_proxy) to display: the target runtime's figures, else the proxy's, marked."""
    if metrics.get("accuracy") is not None or metrics.get("proxy_accuracy") is None:
        return metrics.get("accuracy"), metrics.get("agreement"), False
    return metrics["proxy_accuracy"], metrics.get("proxy_agreement"), True


def verify_label(verify: dict[str, Any]) -> str:
    """The verify status in a table cell: "passed" only when the target's runtime ran it."""
    status = str(verify.get("status", "-"))
    if status in ("proxy", "unverified"):
        return f"{status.upper()} ({' '.join(str(verify.get('runtime', '')).split()[:2])})"
    if status == "passed" and verify.get("proxy"):
        return "passed (+proxy)"
    return status


def verify_bundle(bundle: Path | str, *, run_dir: Path | str | None = None, budget_pt: float | None = None,
                  threads: int | None = None) -> dict[str, Any]:
    """Re-run a bundle's artifact on its run's test split; raises on failure, returns the report.

    The run folder defaults to the one recorded in the manifest's lineage.
    A target whose runtime is absent here is evaluated on its proxy (status
    "proxy") or, without one, reported as skipped, with why.
    """
    from edgecore.bundle import open_bundle
    from edgecore.errors import ModelError
    from targets import get_target, parse_precision
    from toolchain.reference import reference_for
    from toolchain.rundir import RunDir

    b = open_bundle(bundle)
    m = b.manifest
    target = get_target(m.target)
    precision = parse_precision(target, m.precision.value)
    run_path = run_dir or m.lineage.get("run_dir")
    if not run_path:
        raise ModelError(f"{b.root}: manifest names no run folder; pass --run DIR")
    report: dict[str, Any] = {"bundle": str(b.root), "target": target.name, "precision": precision.value,
                              "manifest_sha256": b.manifest_sha256}
    ref = reference_for(Path(run_path))
    if budget_pt is None:
        budget_pt = float(m.metrics.get("accuracy_budget_pt", 1.0))
    source = None
    if not target.available()[0]:
        built_from = m.lineage.get("student_sha256")
        if built_from and built_from != ref.lineage.get("student_sha256"):
            raise ModelError(f"{b.root}: the run's student changed since this bundle was built "
                             f"({str(ref.lineage.get('student_sha256'))[:12]} != {built_from[:12]}); rebuild the bundle")
        source = RunDir(run_path).model_source()
    ev = evaluate(target, b.root, m.artifact, m.input, x_test=ref.x_test, y_test=ref.y_test, ref_test=ref.student_test, precision=precision,
                  budget_pt=budget_pt, labels=ref.labels, source=source, threads=threads, task=ref.task)
    report.update(ev.verify)
    return report
