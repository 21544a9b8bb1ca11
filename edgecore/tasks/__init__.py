"""Tasks, found through one registry (like targets): a name maps to a dotted path, imported on demand.

Third-party tasks register under the ``edge_toolchain.tasks`` entry-point group
(``name = "package.module:TaskClass"``); their training half under ``edge_toolchain.train_tasks``.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

from edgecore.errors import ConfigError
from edgecore.plugins import load, registry

from .base import Task, TaskSpec

__all__ = ["Task", "TaskSpec", "get_task", "task_names", "DEFAULT_TASK"]

ENTRY_POINT_GROUP = "edge_toolchain.tasks"
DEFAULT_TASK = "classify"

BUILTIN: dict[str, str] = {
    "classify": "edgecore.tasks.classify:Classify",
    "detect": "edgecore.tasks.detect:Detect",
}


def _registry() -> dict[str, str]:
    return registry(ENTRY_POINT_GROUP, BUILTIN)


def task_names() -> list[str]:
    return list(_registry())


@functools.lru_cache(maxsize=None)
def task_class(name: str) -> type[Task]:
    reg = _registry()
    if name not in reg:
        raise ConfigError(f"unknown task {name!r}; known: {', '.join(reg)}")
    cls = load(reg[name])
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"task {name!r} ({reg[name]}) is not an edgecore.tasks.Task")
    return cls


def get_task(spec: TaskSpec | str | Mapping[str, Any] | None = None) -> Task:
    """The task for a manifest's ``task`` block, a name, or ``None`` (classification)."""
    if spec is None:
        spec = TaskSpec(DEFAULT_TASK)
    elif isinstance(spec, str):
        spec = TaskSpec(spec)
    elif not isinstance(spec, TaskSpec):
        spec = TaskSpec(str(spec.get("name", DEFAULT_TASK)), dict(spec.get("params") or {}))
    cls = task_class(spec.name)
    problems = cls.check_params(spec.params)
    if problems:
        raise ConfigError(f"task {spec.name!r}: " + "; ".join(problems))
    return cls(spec)
