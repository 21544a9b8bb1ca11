"""Compression passes: each step of ``toolchain compress`` is one class, run from a list.

Modelled on Microsoft Olive's passes (``olive/passes/olive_pass.py``): every pass
subclasses `toolchain.passes.base.Pass`, which registers it by name in
``__init_subclass__``; it owns its typed config section (``[prune]``,
``[distill]``, ``[qat]``, ``[ptq]``: a dataclass with its ``validate`` in the
pass's module, which `toolchain.config` gathers), says whether it quantizes
(``Pass.quantizes``) and implements one ``_run_for_config``.
`PASS_MODULES` maps names to modules, so that a pass is found by name. Pass
modules import torch and their libraries (torch-pruning, torchao) inside the
functions that use them: configs are read and checked without importing torch.
The pipeline itself is `toolchain.compress.compress`, driven by
``compress.passes`` (default ``["prune", "distill", "qat"]``).

This module is torch-free.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from edgecore.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from toolchain.passes.base import Pass

# name -> module that defines it (imported on first use)
PASS_MODULES: dict[str, str] = {
    "prune": "toolchain.passes.prune",
    "distill": "toolchain.passes.distill",
    "qat": "toolchain.passes.qat",
    "ptq": "toolchain.passes.ptq",
}


def pass_list_problem(names: tuple[str, ...] | list[str]) -> str | None:
    """Why ``names`` is not a runnable pass list, or None (torch-free: used by the config)."""
    unknown = [n for n in names if n not in PASS_MODULES]
    if unknown:
        return f"unknown pass {unknown[0]!r} (known: {', '.join(PASS_MODULES)})"
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    if dupes:
        return f"pass {dupes[0]!r} listed twice"
    # a quantized program cannot be trained or pruned: at most one quantizing pass, and last
    quant = [i for i, n in enumerate(names) if get_pass(n).quantizes]
    if len(quant) > 1:
        quantizing = [n for n in PASS_MODULES if get_pass(n).quantizes]
        return f"at most one quantizing pass ({' or '.join(quantizing)})"
    if quant and quant[0] != len(names) - 1:
        return f"{names[quant[0]]!r} must be the last pass (nothing can train or prune a quantized program)"
    return None


def get_pass(name: str) -> "type[Pass]":
    """The pass class registered under ``name`` (imports its module on first use)."""
    from toolchain.passes.base import Pass

    if name not in Pass.registry:
        if name not in PASS_MODULES:
            raise ConfigError(f"unknown compression pass {name!r} (known: {', '.join(PASS_MODULES)})")
        importlib.import_module(PASS_MODULES[name])
    return Pass.registry[name]


__all__ = ["PASS_MODULES", "get_pass", "pass_list_problem"]
