"""The task's training half: loss, distillation loss, the metric a stage selects on, the build gate.

The contract half (confidence, quality, metric on raw outputs, wire answer) is `edgecore.tasks`; a
`TrainTask` holds its `contract` and adds what needs torch or the toolchain. Stages, the build and verify call
these and never ask which task it is (docs/tasks.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from edgecore.spec import Precision
from edgecore.tasks import Task

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from calibration.confidence import TemperatureFit
    from toolchain.verify import VerifyResult

__all__ = ["TrainTask", "LossFn"]

LossFn = Callable[["nn.Module", "torch.Tensor", Any], "torch.Tensor"]


class TrainTask(ABC):
    """One task's training half; ``contract`` is its `edgecore.tasks.Task`."""

    name: ClassVar[str] = ""

    def __init__(self, contract: Task) -> None:
        self.contract = contract

    @abstractmethod
    def loss(self, *, label_smoothing: float = 0.0) -> LossFn:
        """``loss(model, xb, yb)`` for training on the task's targets."""

    @abstractmethod
    def distill_loss(self, teacher: "nn.Module", *, temperature: float, alpha: float,
                     label_smoothing: float = 0.0) -> LossFn:
        """``loss(model, xb, yb)`` mixing the teacher's outputs (softened by ``temperature``) and the targets."""

    def calibrate(self, raw: np.ndarray, targets: Any) -> "TemperatureFit":
        """The temperature that makes `Task.confidence` calibrated on (raw, targets), with ECE before and after."""
        raise NotImplementedError(f"task {self.name!r} does not fit a temperature")

    def model_metric(self, model: "nn.Module", x: "torch.Tensor", y: Any) -> float:
        """The headline metric of ``model`` on (x, y): what stages select checkpoints on and report."""
        from toolchain import engine

        return self.contract.metric(engine.predict(model, x).numpy(), _numpy(y))

    @abstractmethod
    def compare(self, out: np.ndarray, ref_out: np.ndarray, targets: Any, *, precision: Precision, budget_pt: float,
                labels: tuple[str, ...] | list[str] = ()) -> "VerifyResult":
        """The build gate: an artifact's raw outputs against the PyTorch reference's on the test split."""


def _numpy(y: Any) -> Any:
    return y.numpy() if hasattr(y, "numpy") else y
