"""The task's training half: model, data, loss, distillation loss, metric, augmentation, the build gate.

The contract half (confidence, quality, wire answer, parameters) is `edgecore.tasks`; a `TrainTask` holds its
`contract` and adds what needs torch or the toolchain. Stages, the build and verify call these and never ask
which task it is (docs/tasks.md).

A few hooks are class methods: they are needed before the run's task parameters exist (building the model,
choosing the split, reading the config), and the parameters come from the model they build (`task_spec`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import numpy as np

from edgecore.spec import Precision
from edgecore.tasks import Task, TaskSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from calibration.confidence import TemperatureFit
    from edgecore.samples import Sample
    from toolchain.config import ModelConfig
    from toolchain.engine import FitOptions
    from toolchain.passes.base import PassContext
    from toolchain.verify import VerifyResult

__all__ = ["TrainTask", "LossFn", "ExportCheck", "RefreshTargets"]

LossFn = Callable[["nn.Module", "torch.Tensor", Any], "torch.Tensor"]
#: what `TrainTask.export_check` returns: the export report's row for one graph, and its problems
ExportCheck = tuple[dict[str, Any], list[str]]


@dataclass
class RefreshTargets:
    """What a task makes of the collected samples of a refresh (`TrainTask.refresh_targets`)."""

    order: np.ndarray  # indices into the train part, repeats allowed (oversampling): the training rows, in order
    y_train: Any  # the targets of those rows, in the task's split form
    p_train: np.ndarray  # per row, a soft target the loss reads (a classifier's probabilities); (rows, 0) if none
    w_train: np.ndarray  # per row, the loss weight (mean 1)
    y_val: Any  # the held-out part's targets
    notes: dict[str, Any] = field(default_factory=dict)  # what the report states (e.g. the teacher's box score)


class TrainTask(ABC):
    """One task's training half; ``contract`` is its `edgecore.tasks.Task`."""

    name: ClassVar[str] = ""
    #: the ``data.source`` forms this task reads, as the docs write them: a name (``digits``) or a prefix and
    #: what follows it (``yolo:PATH``: any source starting with ``yolo:``)
    sources: ClassVar[tuple[str, ...]] = ()

    def __init__(self, contract: Task) -> None:
        self.contract = contract

    # ------------------------------------------------------------------ before the run's parameters exist

    @classmethod
    def reads_source(cls, source: str) -> bool:
        """Whether ``data.source`` is one of this task's (`sources`)."""
        return any(source == s if ":" not in s else source.startswith(s.split(":", 1)[0] + ":") for s in cls.sources)

    @classmethod
    def build_model(cls, cfg: "ModelConfig", *, input_shape: tuple[int, ...], num_classes: int,
                    what: str = "teacher.family") -> "nn.Module":
        """A fresh model of ``cfg``'s family for this task (``what`` names the config key in errors)."""
        from toolchain.models import build_model

        return build_model(cfg, input_shape=input_shape, num_classes=num_classes, what=what)

    @classmethod
    def task_spec(cls, model: "nn.Module", input_shape: tuple[int, ...]) -> TaskSpec:
        """The run's task block (``data.json`` → ``task``, then every manifest's): name and parameters."""
        return TaskSpec(cls.name)

    @classmethod
    def stratify(cls, y: np.ndarray, labels: tuple[str, ...]) -> np.ndarray | None:
        """What the train/val/test split keeps the proportions of (class indices), or None: a plain seeded
        shuffle. Also checks that ``y`` can be split (`DataError` otherwise)."""
        return None

    def representative_labels(self, y: Any) -> np.ndarray | None:
        """One class index per input to stratify the INT8 representative set on, or None (a random draw)."""
        return None

    # ------------------------------------------------------------------ training

    @abstractmethod
    def loss(self, *, label_smoothing: float = 0.0) -> LossFn:
        """``loss(model, xb, yb)`` for training on the task's targets."""

    @abstractmethod
    def distill_loss(self, teacher: "nn.Module", *, temperature: float, alpha: float,
                     label_smoothing: float = 0.0) -> LossFn:
        """``loss(model, xb, yb)`` mixing the teacher's outputs (softened by ``temperature``) and the targets."""

    def augment(self, xb: "torch.Tensor", yb: Any, opts: "FitOptions") -> tuple["torch.Tensor", Any]:
        """One training batch's augmentation (``opts.augment``, ``opts.rotate_deg``, ``opts.noise_std``); the
        targets change with the inputs where the task's targets are geometric. Default: none."""
        return xb, yb

    def view(self, opts: "FitOptions") -> dict[str, Any]:
        """What `augment` does to a batch under ``opts``, as the reports state it (shift, flip, noise_std,
        rotate_deg, mix, mix_alpha: what is applied, not what was asked), and ``deterministic``: whether every
        input is seen as it is (then a teacher's answers can be computed once). Default: nothing applied."""
        return {"shift": 0, "flip": False, "noise_std": 0.0, "rotate_deg": 0.0, "mix": "none", "mix_alpha": None,
                "deterministic": True}

    def cached_distill_loss(self, teacher: "nn.Module", x: "torch.Tensor", y: Any, *, temperature: float,
                            alpha: float, label_smoothing: float = 0.0) -> "tuple[Any, LossFn] | None":
        """For a deterministic view: (training targets holding the teacher's answers on ``x``, computed once, the
        loss reading them), the same loss as `distill_loss`; None when the task cannot cache them."""
        return None

    @abstractmethod
    def metric(self, raw: np.ndarray, targets: Any) -> float:
        """The split's headline metric in [0, 1] from raw outputs (top-1 accuracy, mAP@0.5:0.95, ...)."""

    @property
    def metric_name(self) -> str:
        return "accuracy"

    @abstractmethod
    def answers_metric(self, predictions: Sequence[Any], targets: Any) -> float:
        """The headline metric of answers as a device gives them (`edgecore.tasks.Task.decide`'s predictions, or
        the gateway's read by `Task.read_reply`), one per input, against ``targets``: what a fleet's devices
        are scored on, edge and cloud answers alike."""

    def model_metric(self, model: "nn.Module", x: "torch.Tensor", y: Any) -> float:
        """The headline metric of ``model`` on (x, y): what stages select checkpoints on and report."""
        from toolchain import engine

        return self.metric(engine.predict(model, x).numpy(), _numpy(y))

    def calibrate(self, raw: np.ndarray, targets: Any) -> "TemperatureFit":
        """The temperature that makes `Task.confidence` calibrated on (raw, targets), with ECE before and after."""
        raise NotImplementedError(f"task {self.name!r} does not fit a temperature")

    # ------------------------------------------------------------------ export and build

    @abstractmethod
    def export_check(self, name: str, out: np.ndarray, ref_out: np.ndarray, targets: Any, *, atol: float | None,
                     min_agreement: float | None) -> ExportCheck:
        """An exported graph's outputs (ONNX Runtime) against its PyTorch source's on the test split: the
        export report's row (``ort_accuracy``, ``torch_accuracy``, ``agreement``, ``max_abs_logit_diff``) and
        the problems (differences above ``atol``, agreement below ``min_agreement``; None: not checked)."""

    @abstractmethod
    def compare(self, out: np.ndarray, ref_out: np.ndarray, targets: Any, *, precision: Precision, budget_pt: float,
                labels: tuple[str, ...] | list[str] = ()) -> "VerifyResult":
        """The build gate: an artifact's raw outputs against the PyTorch reference's on the test split."""


    # ------------------------------------------------------------------ refresh (the closed loop)

    def concat_targets(self, *parts: Any) -> Any:
        """The targets of several parts of a split as one (a refreshed run appends the collected samples)."""
        return np.concatenate(parts)

    @abstractmethod
    def refresh_targets(self, train: "list[Sample]", hold: "list[Sample]", *, num_classes: int, balance: Any,
                        min_box_score: float, rng: np.random.Generator) -> RefreshTargets:
        """The targets of the collected samples (a person's answer where given, else the teacher's), and how the
        train part is weighed (``balance``, `toolchain.config.Balance`; ``min_box_score``: a detector's teacher
        boxes at least this sure are targets). Raises `toolchain.refresh.RefreshError` naming a sample
        that does not fit the run."""

    @abstractmethod
    def refresh_loss(self, ctx: "PassContext", p_collected: np.ndarray, w_collected: np.ndarray, *,
                     alpha: float, temperature: float) -> tuple[Any, LossFn]:
        """(targets for all of ``ctx.train``, the loss) of a refresh's continued training: the original rows
        first, then the collected ones (their soft targets ``p_collected`` and weights ``w_collected``)."""


def budget_problem(metric: str, got: float, ref: float, budget_pt: float, *, unit: str = "") -> str | None:
    """Every task's gate rule: the artifact's ``metric`` (in [0, 1]) at most ``budget_pt`` points below the
    reference's; the problem in one line, or None."""
    drop_pt = (ref - got) * 100.0
    if drop_pt <= budget_pt + 1e-9:
        return None
    return (f"{metric} {got * 100:.2f}{unit} is {drop_pt:.2f} pt below the PyTorch reference {ref * 100:.2f}{unit} "
            f"(budget {budget_pt:.2f} pt, over by {drop_pt - budget_pt:.2f} pt)")


def _numpy(y: Any) -> Any:
    return y.numpy() if hasattr(y, "numpy") else y
