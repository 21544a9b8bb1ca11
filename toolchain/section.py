"""What every config section shares: its ``validate`` beside its fields, and the checks it reports through.

A section is a frozen dataclass, one table of ``toolchain.toml``. Types are checked by `toolchain.config`
(from the annotations); ranges that types cannot express are each section's own ``validate(check)``, written
next to the fields it checks: the run's sections in `toolchain.config`, each compression pass's in its
module (``[prune]`` in `toolchain.passes.prune`, ...). Every error names the field and the file.

Torch-free and importing nothing of the project but the error family, so that pass modules and the config
module can both build on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgecore.errors import ConfigError

#: Epochs one setting may ask for. More is a typo (``1e23``), not a plan: at a second an epoch, 10,000 epochs
#: already run for three hours.
MAX_EPOCHS = 10_000
#: Steps of an iterative search (pruning steps, latency candidates): each one fine-tunes, and may build and
#: time an artifact.
MAX_STEPS = 1_000


@dataclass(frozen=True)
class Check:
    """One section's checks: ``need(cond, key, what)`` raises ``FILE: SECTION.KEY: WHAT, got VALUE``."""

    obj: Any
    section: str
    origin: str

    def error(self, key: str, what: str) -> ConfigError:
        """``FILE: SECTION.KEY: WHAT`` (for messages that are not "…, got VALUE")."""
        return ConfigError(f"{self.origin}: {self.section}.{key}: {what}")

    def need(self, cond: bool, key: str, what: str) -> None:
        if not cond:
            raise self.error(key, f"{what}, got {getattr(self.obj, key)!r}")

    def count(self, key: str, *, low: int, high: int, what: str = "") -> None:
        """An integer count (epochs, steps) in ``[low, high]``: ``must be >= LOW`` (or ``what``) below,
        ``must be at most HIGH`` above."""
        value = getattr(self.obj, key)
        self.need(value >= low, key, what or f"must be >= {low}")
        self.need(value <= high, key, f"must be at most {high:,}")


class Section:
    """Base of the config sections; a section with range checks overrides `validate`."""

    def validate(self, check: Check) -> None:
        """Raise (through ``check``) when a value is out of range; types are already checked."""


__all__ = ["Check", "MAX_EPOCHS", "MAX_STEPS", "Section"]
