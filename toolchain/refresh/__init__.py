"""``toolchain refresh``: the closed loop's training step.

The gateway collects what the fleet was unsure of, answered by the teacher
(docs/gateway.md, "Collected samples"). ``refresh`` pulls those samples (over
HTTP from the gateway, or straight from its database), builds a refresh set
(label = a person's label if given, else the teacher's; de-duplicated by
content; a seeded held-out part kept out of training; classes evened out,
``refresh.balance``: oversampled by default, or by loss weights), writes a
NEW run that is the parent run plus that set (``data.json`` → ``refresh``: its
splits are the source's plus the collected train part, val plus the held-out
part, test unchanged), and there:

1. re-distills the parent's current student from the teacher, continuing from
   its weights (not from scratch), on the original training data plus the
   refresh set (early stopping on the original validation split only);
   ``refresh.candidates`` such continuations, one seed each, are averaged into
   one model (a uniform model soup, BatchNorm re-estimated): fewer answers on
   the original data flip at random, which is what the regression gate counts;
   with ``refresh.strategy = "expert"`` (default) that model becomes an expert
   beside the unchanged student, and a small gate trained to tell the original
   training inputs from the collected ones picks per input
   (`toolchain.models.GatedExperts`): the student's answers on inputs like its
   training data stay its own;
2. re-runs the quantizing pass (QAT) and the export (with the expert strategy:
   on the expert alone, composed with the kept student's quantized program as
   it shipped, so that its answers do not move);
3. builds a bundle for each target the parent run had built (the production
   targets), whose calibration, routing threshold and drift reference are
   refitted on splits that now include the shifted inputs (the drift reference: with ``--device``, the
   collected held-out inputs, what that device now sees; without, the mixture);
4. checks the gates: at most ``refresh.max_regression_pt`` lost on the
   original test split, and better than the parent's bundle, per target, on the
   held-out collected samples. A failed gate keeps the report and removes the
   new bundles (``--force`` keeps them).

Provenance (``reports/refresh.json``): parent run, the sample ids used, their
count and sha256, every gate with its numbers.

The package, by what each part does: `fetch` (pull the samples), `refresh_set` (the refresh set and the new
run), `redistill` (train the continuation, the expert and its gate; quantize), `gates` (the gates and the
table). This module runs them in order.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from .errors import RefreshError
from .fetch import load_samples
from .gates import failed_gates, print_refresh, regression_gate, target_gates
from .redistill import train
from .refresh_set import build_refresh_set, new_run

__all__ = ["RefreshError", "refresh"]


def refresh(*, parent: Path | str, out: Path | str, source: str, token: str | None = None, device: str | None = None,
            targets: list[str] | None = None, signing_key: Any = None, force: bool = False,
            show: bool = True) -> dict[str, Any]:
    """Run the refresh (package docstring); returns the report (also RUN/reports/refresh.json)."""
    from toolchain import engine, pipeline
    from toolchain.rundir import RunDir

    t0 = time.perf_counter()
    parent, out = Path(parent), Path(out)
    prun = RunDir(parent)
    cfg = prun.config()
    engine.set_seed(cfg.run.seed)
    samples = load_samples(source, token=token, device=device)
    spec, labels = prun.input_spec, prun.labels
    r = cfg.refresh
    rs = build_refresh_set(samples, spec, len(labels), holdout=r.holdout_fraction, seed=cfg.run.seed,
                           balance=r.balance, min_samples=r.min_samples, task=prun.task, min_box_score=r.min_box_score)
    new_run(parent, out, rs, source, device)
    _, ctx, trained = train(cfg, out, rs)
    pipeline.export(cfg, out, show=False)
    new_acc = trained["qat_accuracy"] if trained["qat_accuracy"] is not None else trained["student_accuracy"]
    regression = regression_gate(prun, RunDir(out), ctx.test, new_acc, cfg.refresh.max_regression_pt)
    per_target, built = target_gates(parent=parent, out=out, targets=targets, cfg=cfg, rs=rs, parent_run=prun,
                                     signing_key=signing_key)
    gates = [regression, *per_target]
    ok = all(g["ok"] for g in gates)
    report = {
        "command": "refresh", "run_dir": str(out), "parent": str(parent.resolve()), "source": source,
        "device": device, "samples": {"pulled": len(samples), "duplicates": rs.duplicates,
                                      "human_labels": rs.human_labels, "train": len(rs.ids_train),
                                      "train_after_balance": int(len(rs.y_train)),
                                      "balance": cfg.refresh.balance.value,
                                      "holdout": len(rs.ids_holdout),
                                      "ids_train": rs.ids_train, "ids_holdout": rs.ids_holdout, "sha256": rs.sha256,
                                      **rs.notes},
        "stages": trained["stages"], "candidates_test_accuracy": trained["candidates_test_accuracy"],
        "strategy": trained["strategy"], "gate": trained["gate"],
        "gates": gates, "passed": ok, "forced": force and not ok,
        "bundles": built if ok or force else {}, "seconds": round(time.perf_counter() - t0, 1),
    }
    if not ok and not force:
        shutil.rmtree(out / "bundles", ignore_errors=True)
    RunDir(out).write_report("refresh", report)
    if show:
        print_refresh(report)
    if not ok and not force:
        raise RefreshError(f"refresh gates failed ({failed_gates(gates)}); no bundles written (report: "
                           f"{out / 'reports' / 'refresh.json'}; --force keeps them)")
    return report
