"""The training half of each task, found by the task's name (`edgecore.tasks` has the contract half)."""

from __future__ import annotations

import functools
from typing import Any

from edgecore.errors import ConfigError
from edgecore.plugins import load, registry
from edgecore.tasks import DEFAULT_TASK, TaskSpec, get_task, task_names

from .base import LossFn, TrainTask

__all__ = ["TrainTask", "LossFn", "get_train_task", "train_task_class", "source_task"]

ENTRY_POINT_GROUP = "edge_toolchain.train_tasks"

BUILTIN: dict[str, str] = {
    "classify": "toolchain.tasks.classify:ClassifyTraining",
    "detect": "toolchain.tasks.detect:DetectTraining",
}


def _registry() -> dict[str, str]:
    return registry(ENTRY_POINT_GROUP, BUILTIN)


@functools.lru_cache(maxsize=None)
def train_task_class(name: str | None = None) -> type[TrainTask]:
    """The training half's class for the task ``name`` (``None``: classification); its class methods (model,
    split, sources) work before the run's task parameters exist."""
    name = name or DEFAULT_TASK
    found = _registry()
    if name not in found:
        raise ConfigError(f"task {name!r} has no training half here (known: {', '.join(found)}; "
                          f"contract tasks: {', '.join(task_names())})")
    cls = load(found[name])
    if not (isinstance(cls, type) and issubclass(cls, TrainTask)):
        raise ConfigError(f"task {name!r} ({found[name]}) is not a toolchain.tasks.TrainTask")
    return cls


def get_train_task(spec: TaskSpec | str | dict[str, Any] | None = None) -> TrainTask:
    """The training half of the task ``spec`` names (``None``: classification), its parameters checked."""
    contract = get_task(spec)
    return train_task_class(contract.name)(contract)


def source_task(source: str) -> str | None:
    """The task whose training half reads ``data.source`` (None: no task does)."""
    for name in _registry():
        try:
            if train_task_class(name).reads_source(source):
                return name
        except (ConfigError, ImportError):  # a broken third-party entry point does not hide the others
            continue
    return None


def source_names() -> list[str]:
    """Every task's ``data.source`` forms, for messages (``shapes``, ``yolo:PATH`` ...)."""
    out: list[str] = []
    for name in _registry():
        try:
            out += list(train_task_class(name).sources)
        except (ConfigError, ImportError):
            continue
    return out
