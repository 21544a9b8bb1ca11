"""The gateway's own evidence before a promotion: the candidate bundle against the bundle it replaces, on inputs
the gateway holds, with labels no device supplied.

A canary's status and telemetry are what the device says about itself: a device that lies (or is broken in a
way that looks healthy) must never get a bundle promoted to the fleet. So before promoting, the gateway runs
both bundles itself, on its own runtime (`targets.load_runner`; where the bundle's runtime is absent here, its
proxy), on

- the **original inputs**: the test split of the teacher's run (when the gateway's teacher is a run directory),
  labelled by their ground truth; no stage of the candidate's compression selected on them;
- the **collected inputs**: what the rollout's devices (its model line) sent for an answer, labelled by a person
  where one did, else by the teacher (what the gateway answered), newest first, at most ``max_collected``.

Each bundle's figure is the mean of its task's per-input quality (`Task.quality`: top-1 right for a classifier,
a frame's AP@0.5 for a detector). The candidate passes when it is at most ``max_drop_pt`` points below the
bundle it replaces on every source with at least ``min_inputs`` inputs, and at least one source has them.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecore.errors import EdgeError

log = logging.getLogger(__name__)

MIN_INPUTS = 20  # a source with fewer inputs than this is not evidence


class NoEvidence(EdgeError):
    """The gateway holds no inputs to judge the bundle on (the rollout then waits for a person's approval)."""


@dataclass
class CandidateEvaluator:
    """``evaluate(candidate_tar, previous_tar, devices)`` -> the evidence dict (`evaluate`)."""

    store: Any  # GatewayStore: its collected samples
    teacher_run: Path | None  # a toolchain run directory (its test split), or None
    max_drop_pt: float = 1.0
    min_inputs: int = MIN_INPUTS
    max_collected: int = 2000

    def evaluate(self, candidate: Path, previous: Path | None, devices: list[str] | None = None) -> dict[str, Any]:
        """Both bundles on each source: ``{"sources": {name: {inputs, candidate, previous, drop_pt, ok}}, "ok",
        "why"}``. Raises `NoEvidence` when no source has ``min_inputs`` inputs, `EdgeError` when a bundle cannot
        be opened or run here."""
        from edgecore.bundle import open_bundle

        with tempfile.TemporaryDirectory(prefix="edge-gw-eval-") as tmp:
            cand = open_bundle(_extract(candidate, Path(tmp) / "candidate"))
            prev = open_bundle(_extract(previous, Path(tmp) / "previous")) if previous is not None else None
            sources: dict[str, dict[str, Any]] = {}
            for name, data in (("original test split", self._original()),
                               ("collected inputs", self._collected(cand, devices))):
                if data is None or len(data[0]) < self.min_inputs:
                    sources[name] = {"inputs": 0 if data is None else len(data[0]), "used": False}
                    continue
                x, y, preprocessed = data
                q_c = _quality(cand, x, y, preprocessed)
                q_p = _quality(prev, x, y, preprocessed) if prev is not None else None
                drop = None if q_p is None else round((q_p - q_c) * 100, 2)
                sources[name] = {"inputs": len(x), "used": True, "candidate": round(q_c, 4),
                                 "previous": None if q_p is None else round(q_p, 4), "drop_pt": drop,
                                 "ok": drop is None or drop <= self.max_drop_pt}
        used = {k: v for k, v in sources.items() if v["used"]}
        if not used:
            raise NoEvidence("the gateway holds no inputs to evaluate the bundle on (" + "; ".join(
                f"{k}: {v['inputs']}" for k, v in sources.items()) + f", {self.min_inputs} needed)")
        bad = [k for k, v in used.items() if not v["ok"]]
        why = "; ".join(f"{k}: {used[k]['candidate']:.2%} against {used[k]['previous']:.2%} "
                        f"({used[k]['drop_pt']:.2f} pt lost, at most {self.max_drop_pt:g})" for k in bad)
        return {"sources": sources, "ok": not bad, "why": why or None, "max_drop_pt": self.max_drop_pt}

    def _original(self) -> tuple[np.ndarray, Any, bool] | None:
        run = self.teacher_run
        if run is None or not (run / "data.json").is_file():
            return None
        try:
            from toolchain.rundir import RunDir

            x, y = RunDir(run).splits().test
        except Exception as e:  # a run the gateway cannot reload: no evidence from it, said once
            log.warning("rollout evaluation: cannot read the test split of %s: %s", run, e)
            return None
        return x, y, False

    def _collected(self, cand: Any, devices: list[str] | None) -> tuple[np.ndarray, Any, bool] | None:
        from edgecore.samples import Sample, SampleError
        from edgecore.tasks import get_task

        task = get_task(cand.manifest.task)
        shape = tuple(cand.input_spec.sample_shape)
        rows = self.store.samples.rows(limit=self.max_collected, newest=True, devices=devices)
        samples = []
        for r in rows:
            try:
                s = Sample.from_row(r)
            except SampleError:
                continue
            x = s.input[0] if s.input.ndim == len(shape) + 1 and s.input.shape[0] == 1 else s.input
            if tuple(x.shape) == shape:
                samples.append((x, s))
        if not samples:
            return None
        y = task.sample_targets([s for _, s in samples])
        return np.stack([x for x, _ in samples]).astype(np.float32), y, True


def _extract(tar: Path, dest: Path) -> Path:
    from edgecore.bundle import extract_tarball

    return extract_tarball(tar, dest) if tar.is_file() else tar


def _quality(bundle: Any, x: np.ndarray, y: Any, preprocessed: bool) -> float:
    """Mean per-input quality of ``bundle`` on ``x`` (raw, or already preprocessed: collected inputs)."""
    from edgecore.tasks import get_task
    from targets import load_runner

    runner = load_runner(bundle, threads=1)
    xp = x if preprocessed else bundle.input_spec.preprocess(x)
    out = np.concatenate([np.asarray(runner.run(xp[i:i + 64])) for i in range(0, len(xp), 64)])
    return float(np.mean(get_task(bundle.manifest.task).quality(out, y)))
