"""The task contract: what differs between classification, detection, … and every side must agree on.

A task is a plug-in like a target (docs/tasks.md). This half is the contract every machine shares, numpy
only: the device, the gateway, the build and the bench all read a model's raw outputs through it. It owns

- `TaskSpec`: the manifest's ``task`` block (the task's name and its parameters, validated on read);
- `Task.confidence`: the per-input score routing calibrates (higher = surer);
- `Task.quality`: how right one input's answer is against its target (1/0 for a class, a per-image score for
  detections), what the routing curve and the build's edge-vs-cloud comparison add up;
- `Task.answer`: the answer one raw output becomes on the wire (the gateway's teacher answer);
- the device's side: `Task.decide` (a batch's predictions and confidences from one pass over the outputs),
  `Task.row_scorer` (the fast one-input path, where the task has one), `Task.label`, `Task.read_reply` (the
  gateway's answer as a prediction) and `Task.output_stats` (what telemetry and drift see of the answers).
- `Task.postprocess`: the per-frame step between the runtime's raw output and an answer (a detector's decode and
  NMS), which the bench times on its own (`postprocess_label` names it; None: the task has no such step).

The training half (loss, distillation loss, the split's headline metric, the build gate's comparison, the
refresh target) is in `toolchain.tasks`, which imports torch; nothing here does. The device never computes a
split's metric (mAP needs pycocotools), so that is the training half's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

__all__ = ["Task", "TaskSpec"]


@dataclass(frozen=True)
class TaskSpec:
    """The manifest's ``task`` block: which task reads the outputs, with its parameters (JSON values)."""

    name: str = "classify"
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}


class Task(ABC):
    """One task's contract half. Subclasses set `name` and implement the methods below (numpy only)."""

    name: ClassVar[str] = ""
    #: what `postprocess` is called in benchmark tables (``"decode+NMS"``); None: the raw output is the answer's
    #: input as it stands, and the bench times no step after the runtime call
    postprocess_label: ClassVar[str | None] = None

    def __init__(self, spec: TaskSpec | None = None) -> None:
        self.spec = spec or TaskSpec(self.name)

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> list[str]:
        """Problems with a manifest's task parameters, one string each (``[]``: fine). Default: none allowed."""
        return [f"unknown parameter {k!r}" for k in params]

    @abstractmethod
    def confidence(self, raw: np.ndarray, *, measure: str, temperature: float) -> np.ndarray:
        """Per-input confidence of the raw outputs ``raw`` (N, ...), in [0, 1]; routing offloads the lowest."""

    @abstractmethod
    def quality(self, raw: np.ndarray, targets: Any) -> np.ndarray:
        """Per-input quality of the answers in ``raw`` against ``targets``, in [0, 1] (float64, shape (N,))."""

    @abstractmethod
    def answer(self, raw_one: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
        """The JSON answer for one input's raw output (shape without the batch axis)."""

    @abstractmethod
    def teacher_record(self, answer: Mapping[str, Any]) -> tuple[bytes, int, float]:
        """What the gateway stores of a collected input's teacher answer (`answer`'s form): (the answer as
        bytes, a class index summarising it (-1: none), its uncertainty in [0, 1], higher = less sure)."""

    @abstractmethod
    def sample_targets(self, samples: Sequence[Any]) -> Any:
        """Collected samples' answers (`edgecore.samples.Sample`: a person's, else the teacher's) as targets in
        the split form `quality` reads: what the gateway evaluates a candidate bundle against."""

    # --- the device's side: what the agent asks of a model's outputs ----------------------------------------
    #: names of the per-input output statistics `output_stats` gives (telemetry summarises them per window and
    #: the drift monitor compares them with the bundle's reference); empty: the task has none
    OUTPUT_STATS: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def output_shape(self, n_labels: int) -> tuple[int, ...]:
        """The raw output's shape for one input, without the batch axis (a runner must answer with it)."""

    @abstractmethod
    def decide(self, raw: np.ndarray, *, measure: str, temperature: float,
               labels: Sequence[str]) -> tuple[Sequence[Any], np.ndarray]:
        """One pass over a batch's raw outputs: (the prediction of each input, their confidences (N,) float64).

        A prediction is what the device answers with (a class index, a list of detections); as plain JSON, or
        numpy integers in one array (the agent makes them Python numbers with ``tolist``).
        """

    def row_scorer(self, measure: str, temperature: float,
                   quant: tuple[float, int, int] | None) -> Callable[[Sequence[float]], tuple[Any, float]] | None:
        """``score(row) -> (prediction, confidence)`` for one input's output given as a Python list (a runner's
        one-input path, `targets.base.OneInput`), or None when the task reads outputs only as arrays (`decide`)."""
        return None

    def label(self, prediction: Any, labels: Sequence[str]) -> str:
        """A short text for a prediction (a class's name; for detections, the names of what was found)."""
        return str(prediction)

    @abstractmethod
    def read_reply(self, reply: Mapping[str, Any]) -> Any | None:
        """The prediction in the gateway's answer (`answer`'s form, docs/wire.md), or None when the reply does not
        hold a well-formed one (the device then falls back to its own, reason ``error``)."""

    def output_stats(self, prediction: Any) -> tuple[float, ...]:
        """One prediction's `OUTPUT_STATS` values (finite floats)."""
        return ()
    def postprocess(self, raw: np.ndarray) -> Any:
        """The work each frame's raw output ``raw`` (N, ...) needs before it is an answer, as the device does it
        (detect: decode + NMS with the manifest's parameters). The bench times it per frame, beside the runtime
        call, when `postprocess_label` is set. Default: none (the raw output itself)."""
        return raw
