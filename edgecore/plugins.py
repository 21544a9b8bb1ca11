"""Plug-ins found by name: built-ins mapped to dotted paths, plus what installed packages register.

Targets (``edge_toolchain.targets``) and tasks (``edge_toolchain.tasks``, ``edge_toolchain.train_tasks``) are
found the same way: a built-in name maps to ``"package.module:Attr"`` and is imported only when asked for; a
third-party package adds names under the group's entry points (a built-in name wins). Reading the installed
distributions' entry points takes tens of milliseconds, so each group is read once per process.
"""

from __future__ import annotations

import functools
import importlib
from importlib import metadata
from typing import Any, Mapping

__all__ = ["registry", "load"]


@functools.lru_cache(maxsize=None)
def _installed(group: str) -> tuple[tuple[str, str], ...]:
    return tuple((ep.name, ep.value) for ep in metadata.entry_points(group=group))


def registry(group: str, builtin: Mapping[str, str]) -> dict[str, str]:
    """``{name: "package.module:Attr"}``: the built-ins, then the group's entry points under names not taken."""
    found = dict(builtin)
    for name, value in _installed(group):
        found.setdefault(name, value)
    return found


def load(dotted: str) -> Any:
    """The attribute ``"package.module:Attr"`` names (its module imported now)."""
    module, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module), attr)
