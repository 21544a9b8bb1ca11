"""The training half of each task, found by the task's name (`edgecore.tasks` has the contract half)."""

from __future__ import annotations

import functools
import importlib
from importlib import metadata
from typing import Any

from edgecore.errors import ConfigError
from edgecore.tasks import TaskSpec, get_task, task_names

from .base import LossFn, TrainTask

__all__ = ["TrainTask", "LossFn", "get_train_task"]

ENTRY_POINT_GROUP = "edge_toolchain.train_tasks"

BUILTIN: dict[str, str] = {
    "classify": "toolchain.tasks.classify:ClassifyTraining",
}


@functools.lru_cache(maxsize=1)
def _registry() -> dict[str, str]:
    found = dict(BUILTIN)
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def get_train_task(spec: TaskSpec | str | dict[str, Any] | None = None) -> TrainTask:
    """The training half of the task ``spec`` names (``None``: classification)."""
    contract = get_task(spec)
    found = _registry()
    if contract.name not in found:
        raise ConfigError(f"task {contract.name!r} has no training half here (known: {', '.join(found)}; "
                          f"contract tasks: {', '.join(task_names())})")
    module, _, attr = found[contract.name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    return cls(contract)
