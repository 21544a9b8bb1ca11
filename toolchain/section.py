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


class Section:
    """Base of the config sections; a section with range checks overrides `validate`."""

    def validate(self, check: Check) -> None:
        """Raise (through ``check``) when a value is out of range; types are already checked."""


__all__ = ["Check", "Section"]
