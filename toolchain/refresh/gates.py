"""The refresh's gates (regression on the original test split, and per production target the held-out collected
samples against the parent) and the table an operator reads."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from edgecore.errors import EdgeError

from .errors import RefreshError
from .refresh_set import RefreshSet


def regression_gate(parent_run: Any, out_run: Any, test: tuple[Any, Any], new_acc: float,
                    max_pt: float) -> dict[str, Any]:
    """At most ``max_pt`` lost on the original test split (the new figure ``new_acc``, of the shipped model, in the
    task's metric: accuracy, mAP@0.5:0.95)."""
    task = parent_run.task
    parent_out = _shipped_outputs(parent_run, test)  # once: the metric and the paired comparison both read it
    before = task.metric(parent_out, _np(test[1]))
    return {
        "gate": "original test split", "before": before, "after": new_acc,
        "lost_pt": round((before - new_acc) * 100, 2), "max_pt": max_pt,
        "ok": (before - new_acc) * 100 <= max_pt + 1e-9,
        # how sure the loss is, from the same inputs scored by both models (the rule above is the point estimate)
        "paired": paired_difference(_right(task, parent_out, test[1]),
                                    _right(task, _shipped_outputs(out_run, test), test[1])),
    }


def target_gates(*, parent: Path, out: Path, targets: list[str] | None, cfg: Any, rs: RefreshSet, parent_run: Any,
                 signing_key: Any) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Build each production target in ``out`` and gate it against the parent on the held-out collected samples.

    A build that fails (e.g. the new int8 artifact fails its accuracy gate) is a failed gate: this refresh cannot
    ship there. Returns the gates and the bundles built."""
    from toolchain.bundle import build_bundle

    gates: list[dict[str, Any]] = []
    built: dict[str, str] = {}
    for target, precision in _production_targets(parent, targets):
        name = f"{target}-{precision}"
        dest = out / "bundles" / name
        try:
            build_bundle(run_dir=out, target=target, precision=precision, out=dest, cfg=cfg.build,
                         signing_key=signing_key)
        except EdgeError as e:
            gates.append({"gate": f"build {name}", "ok": False, "error": f"{type(e).__name__}: {e}"})
            continue
        old = parent / "bundles" / name
        after = bundle_accuracy(dest, rs.x_val, rs.y_val)
        if (old / "manifest.json").is_file():
            before_b, versus = bundle_accuracy(old, rs.x_val, rs.y_val), f"parent bundle {name}"
        else:  # the parent never built this target: its shipped PyTorch model stands in
            x_held_out = parent_run.input_spec.preprocess(rs.x_val)
            before_b = float(parent_run.task.metric(_shipped_outputs(parent_run, (x_held_out, rs.y_val)), rs.y_val))
            versus = "parent model (PyTorch)"
        gates.append({"gate": f"held-out collected samples, {name}", "versus": versus, "before": before_b,
                      "after": after, "ok": after > before_b})
        built[name] = str(dest)
    return gates, built


def failed_gates(gates: list[dict[str, Any]]) -> str:
    """The failed gates in one line, for the error."""
    return "; ".join(f"{g['gate']}: {g['error']}" if "error" in g else
                     f"{g['gate']}: {g['before']:.4f} -> {g['after']:.4f}{_paired_words(g.get('paired'))}"
                     for g in gates if not g["ok"])


def _production_targets(parent: Path, targets: list[str] | None) -> list[tuple[str, str]]:
    names = list(targets or [])
    if not names and (parent / "bundles").is_dir():
        names = sorted(p.name for p in (parent / "bundles").iterdir() if p.is_dir() and (p / "manifest.json").is_file())
    out = []
    for n in names or ["onnx-int8"]:
        t, _, p = n.rpartition("-")
        if not t:
            raise RefreshError(f"target {n!r}: expected TARGET-PRECISION such as onnx-int8")
        out.append((t, p))
    return out


def bundle_accuracy(bundle: Path, x_raw: np.ndarray, y: Any) -> float:
    """A built bundle's figure on raw inputs in its task's metric (accuracy, mAP): its model alone (own
    preprocessing, one input at a time, no routing)."""
    from edgecore.bundle import open_bundle
    from targets import load_runner
    from toolchain.tasks import get_train_task

    b = open_bundle(bundle)  # our own build's hashes are checked; whose signature it carries does not matter here
    runner = load_runner(b)
    x = b.input_spec.preprocess(x_raw)
    out = np.concatenate([np.asarray(runner.run(x[i:i + 1])) for i in range(len(x))])
    return float(get_train_task(b.manifest.task).metric(out, y))


def _shipped_outputs(run: Any, data: tuple[Any, Any]) -> np.ndarray:
    """The raw outputs of the run's shipped model (QAT program, else fp32 student) on ``data``'s normalised inputs."""
    import torch

    from toolchain import engine
    from toolchain.rundir import RunDir

    model = run.load_student_qat() if (run.path / RunDir.STUDENT_QAT).is_file() else run.load_student()
    x = data[0]
    return engine.predict(model, torch.as_tensor(x) if isinstance(x, np.ndarray) else x).numpy()


def _right(task: Any, out: np.ndarray, y: Any) -> np.ndarray:
    """Per input, whether the answer is right: its quality (`Task.quality`: 1/0 for a class, a frame's AP@0.5) at
    least one half."""
    return np.asarray(task.contract.quality(out, _np(y))) >= 0.5


def _np(y: Any) -> Any:
    return y.numpy() if hasattr(y, "numpy") else np.asarray(y)


def _paired_words(pr: dict[str, Any] | None) -> str:
    if not pr:
        return ""
    lo, hi = pr["lost_pt_ci95"]
    return (f" ({pr['lost_pt']:.2f} pt lost, 95% interval {lo:+.2f} to {hi:+.2f}: {pr['lost']} of {pr['inputs']} "
            f"inputs lost, {pr['gained']} gained, McNemar p = {pr['mcnemar_p']:.3g})")


def paired_difference(before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    """How much accuracy two models differ by on the same inputs, and how sure that is.

    ``before``/``after``: per input, right or wrong. Only the inputs where they disagree carry information:
    ``lost`` (right before, wrong after) and ``gained``. Reports the points lost with a 95% interval (Wald, on
    the paired difference) and McNemar's exact two-sided p-value (a binomial test of lost vs gained).
    """
    b = np.asarray(before, bool)
    a = np.asarray(after, bool)
    if b.shape != a.shape or b.ndim != 1 or not len(b):
        raise ValueError(f"paired results must be two equal, non-empty 1-D arrays, got {b.shape} and {a.shape}")
    n, lost, gained = len(b), int((b & ~a).sum()), int((~b & a).sum())
    d = (lost - gained) / n
    se = math.sqrt(max(lost + gained - (lost - gained) ** 2 / n, 0.0)) / n
    k, m = min(lost, gained), lost + gained
    if m > 2000:  # the normal approximation, with continuity correction: exact sums of big binomials are slow
        p = min(1.0, math.erfc((abs(lost - gained) - 1) / math.sqrt(m) / math.sqrt(2)))
    else:
        p = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m) if m else 1.0
    return {"inputs": n, "lost": lost, "gained": gained, "lost_pt": round(100 * d, 2),
            "lost_pt_ci95": [round(100 * (d - 1.96 * se), 2), round(100 * (d + 1.96 * se), 2)],
            "mcnemar_p": round(p, 4)}


def print_refresh(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["samples"]
    t = Table(title=f"refresh gates ({s['train']} collected samples trained on, {s['holdout']} held out, "
                    f"{s['human_labels']} labelled by a person, {s['duplicates']} duplicates dropped)")
    for col in ("gate", "before", "after", "ok"):
        t.add_column(col, justify="left" if col == "gate" else "right")
    pct = lambda v: "-" if v is None else f"{v:.2%}"  # noqa: E731
    for g in report["gates"]:
        t.add_row(g["gate"], pct(g.get("before")), pct(g.get("after")), "[green]pass[/]" if g["ok"] else "[red]FAIL[/]")
    con = Console(stderr=True)
    con.print(t)
    for g in report["gates"]:
        if "error" in g:
            con.print(f"{g['gate']}: {g['error']}", highlight=False)
        if g.get("paired"):
            con.print(f"{g['gate']}:{_paired_words(g['paired'])}", highlight=False)
    gate = report.get("gate")
    if gate:
        share = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
        con.print(f"strategy expert: the student is kept; the gate ({gate['params']} parameters) sends "
                  f"{share(gate['original_val_to_student'])} of the original validation inputs to it and "
                  f"{share(gate['held_out_to_expert'])} of the held-out collected ones to the expert "
                  f"(expert alone: {gate['expert_test_accuracy']:.2%} on the original test split)", highlight=False)
        grow = gate.get("growth")
        if grow:
            con.print(f"parameters {grow['params_before']:,} → {grow['params_after']:,}, MACs per input "
                      f"{grow['macs_before']:,} → {grow['macs_after']:,} "
                      f"(strategy \"continue\" keeps the size and forgets more)", highlight=False)
