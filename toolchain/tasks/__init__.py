"""The training half of each task, found by the task's name (`edgecore.tasks` has the contract half)."""

from __future__ import annotations

from typing import Any

from edgecore.errors import ConfigError
from edgecore.plugins import load, registry
from edgecore.tasks import TaskSpec, get_task, task_names

from .base import LossFn, TrainTask

__all__ = ["TrainTask", "LossFn", "get_train_task"]

ENTRY_POINT_GROUP = "edge_toolchain.train_tasks"

BUILTIN: dict[str, str] = {
    "classify": "toolchain.tasks.classify:ClassifyTraining",
}


def get_train_task(spec: TaskSpec | str | dict[str, Any] | None = None) -> TrainTask:
    """The training half of the task ``spec`` names (``None``: classification)."""
    contract = get_task(spec)
    found = registry(ENTRY_POINT_GROUP, BUILTIN)
    if contract.name not in found:
        raise ConfigError(f"task {contract.name!r} has no training half here (known: {', '.join(found)}; "
                          f"contract tasks: {', '.join(task_names())})")
    return load(found[contract.name])(contract)
