"""Which per-image uncertainty score tells best which frames the teacher would improve: the cascade for frames.

    python docs/acceptance/frame_routing.py RUN [RUN ...] [--budgets 0.05 0.1 0.2] [--json OUT.json]

RUN: a ``task = "detect"`` run directory (trained and compressed). On its test split, the student's and the
teacher's raw outputs (PyTorch) are decoded; each candidate score ranks the frames, the least sure ones (the
budget's share) are answered by the teacher, and the system's mAP@0.5:0.95 (pycocotools) is computed on the
mixed answers. The share of the student-teacher gap each score recovers at each budget is printed; a score
that predicts the teacher's gain recovers more at the same budget. ``random`` is the floor.

Candidates (higher = surer; every one from the decoded detections with scores above the decode threshold):

- ``weakest``: the least ``|2s - 1|`` over the frame's detections (the device's measure, `edgecore.tasks.detect`);
- ``ambiguous``: 1 - the share of detections whose score lies in [0.3, 0.7];
- ``top``: the best detection's score (a frame where nothing is sure is unsure);
- ``mass``: the summed score of the detections in [0.3, 0.7], negated (crowded ambiguity weighs more);
- ``random``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _scores(dets: list[Any]) -> dict[str, np.ndarray]:
    def per(fn: Callable[[np.ndarray], float]) -> np.ndarray:
        return np.array([fn(np.asarray(d.scores, np.float64)) for d in dets])

    return {
        "weakest": per(lambda s: float(np.min(np.abs(2 * s - 1))) if len(s) else 1.0),
        "ambiguous": per(lambda s: 1.0 - float(np.mean((s >= 0.3) & (s <= 0.7))) if len(s) else 1.0),
        "top": per(lambda s: float(s.max()) if len(s) else 0.0),
        "mass": per(lambda s: -float(s[(s >= 0.3) & (s <= 0.7)].sum())),
        "random": np.random.default_rng(0).random(len(dets)),
    }


def one(run_dir: Path, budgets: list[float]) -> dict[str, Any]:
    from toolchain.reference import _torch_logits, reference_for
    from toolchain.rundir import RunDir

    run = RunDir(run_dir)
    ref = reference_for(run_dir)
    task = ref.task
    teacher = _torch_logits(run.load_teacher(), ref.x_test)
    student = ref.student_test
    y = ref.y_test
    edge_map, cloud_map = task.metric(student, y), task.metric(teacher, y)
    rows = []
    for name, conf in _scores(task.contract.detections(student)).items():
        order = np.argsort(conf, kind="stable")
        for b in budgets:
            k = int(round(b * len(y)))
            mixed = student.copy()
            mixed[order[:k]] = teacher[order[:k]]
            system = task.metric(mixed, y)
            gap = cloud_map - edge_map
            rows.append({"score": name, "budget": b, "sent": k, "system_map": system,
                         "recovered": (system - edge_map) / gap if abs(gap) > 1e-9 else float("nan")})
    return {"run": str(run_dir), "n_test": int(len(y)), "student_map": edge_map, "teacher_map": cloud_map, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    results = [one(r, a.budgets) for r in a.runs]
    for res in results:
        print(f"\n{res['run']}: {res['n_test']} test frames, student mAP {res['student_map']:.4f}, "
              f"teacher {res['teacher_map']:.4f}\n")
        print("| score | " + " | ".join(f"{b:.0%} sent: system mAP (gap recovered)" for b in a.budgets) + " |")
        print("|---|" + "---|" * len(a.budgets))
        for name in dict.fromkeys(r["score"] for r in res["rows"]):
            cells = [f"{r['system_map']:.4f} ({r['recovered']:.0%})" for r in res["rows"] if r["score"] == name]
            print(f"| {name} | " + " | ".join(cells) + " |")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
