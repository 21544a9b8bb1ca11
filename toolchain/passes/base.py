"""The pass interface and what passes share: the context, the output, the fit options.

A pass takes the current fp32 student and returns a new model (an fp32 student,
or for a quantizing pass the converted program with its serialised bytes) plus
its own report section. It reads only its config section and the context.
"""

from __future__ import annotations

import inspect
import io
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from toolchain.config import Config
    from toolchain.engine import FitOptions
    from toolchain.tasks import TrainTask


@dataclass
class PassContext:
    """Everything a pass may read: the config, the teacher and the normalised splits."""

    cfg: Config
    teacher: "nn.Module"
    train: tuple["torch.Tensor", "torch.Tensor"]
    val: tuple["torch.Tensor", "torch.Tensor"]
    test: tuple["torch.Tensor", "torch.Tensor"]
    input_shape: tuple[int, ...]
    num_classes: int
    augment: bool
    # sizes of the teacher, the reference every reduction is measured against
    teacher_params: int = 0
    teacher_macs: int = 0
    run_dir: "Path | None" = None  # where passes may keep their own files (the latency search's cache, plot)
    input_spec: Any = None  # the run's InputSpec (normalisation), for passes that build artifacts
    labels: tuple[str, ...] = ()
    task: "TrainTask | None" = None  # the run's task (loss, metric); None: classification
    recipe: dict[str, Any] = field(default_factory=dict)  # the training recipe ``cfg`` was resolved with

    def __post_init__(self) -> None:
        if self.task is None:
            from toolchain.tasks import get_train_task

            self.task = get_train_task()

    @property
    def train_task(self) -> "TrainTask":
        assert self.task is not None  # set in __post_init__
        return self.task

    def metric(self, model: "nn.Module", split: tuple["torch.Tensor", Any]) -> float:
        """The task's headline metric of ``model`` on a split (``ctx.test``, ``ctx.val``)."""
        return self.train_task.model_metric(model, *split)

    def fit_options(self, *, epochs: int, lr: float, desc: str, seed_offset: int, **kw: Any) -> "FitOptions":
        """The run's shared training options (batch size, AMP, progress, seed) for one pass."""
        from toolchain.engine import FitOptions

        c = self.cfg
        opts: dict[str, Any] = dict(
            weight_decay=c.train.weight_decay, batch_size=c.data.batch_size, augment=self.augment,
            amp=c.train.amp, progress=c.train.progress, seed=c.run.seed + seed_offset,
        )
        opts.update(kw)
        return FitOptions(epochs=epochs, lr=lr, desc=desc, **opts)


@dataclass
class PassOutput:
    model: "nn.Module"
    summary: dict[str, Any] = field(default_factory=dict)  # this pass's report section
    program: bytes | None = None  # quantizing passes: the serialised program (student_qat.pt)


class Pass(ABC):
    """One compression step. Subclasses set `name`, `section`, `stage` and implement `_run_for_config`."""

    registry: ClassVar[dict[str, type["Pass"]]] = {}
    name: ClassVar[str] = ""  # as listed in compress.passes
    section: ClassVar[str] = ""  # the Config field holding this pass's typed config
    stage: ClassVar[str] = ""  # its row in the compress table
    quantizes: ClassVar[bool] = False  # the output is a quantized program, not an fp32 student

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not inspect.isabstract(cls) and cls.name:
            Pass.registry[cls.name] = cls

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.config = getattr(cfg, self.section)

    def stage_for(self, summary: dict[str, Any]) -> str:
        """This pass's row in the compress table, given what it reports (default: `stage`)."""
        return self.stage

    def run(self, student: "nn.Module", ctx: PassContext) -> tuple[PassOutput, float]:
        """Run on ``student`` (not modified); returns the output and the seconds it took."""
        t = time.perf_counter()
        out = self._run_for_config(student, self.config, ctx)
        return out, time.perf_counter() - t

    @abstractmethod
    def _run_for_config(self, student: "nn.Module", config: Any, ctx: PassContext) -> PassOutput:
        """The pass itself: ``config`` is this pass's section of the run config."""


def state_size(model: "nn.Module") -> int:
    """Bytes of the model's state_dict as torch.save writes it."""
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(buf.getvalue())


def stage_row(stage: str, model: "nn.Module", ctx: PassContext, *, size: int, seconds: float,
              accuracy: float | None = None, **extra: Any) -> dict[str, Any]:
    """One row of the compress table: size, cost and test accuracy of ``model``."""
    from toolchain.models import count_macs, count_params

    acc = ctx.metric(model, ctx.test) if accuracy is None else accuracy
    return {"stage": stage, "params": count_params(model), "macs": count_macs(model, ctx.input_shape),
            "size_bytes": size, "test_accuracy": acc, "seconds": round(seconds, 2), **extra}
