"""The refresh's one error."""

from __future__ import annotations

from edgecore.errors import EdgeError


class RefreshError(EdgeError):
    """A refresh that cannot run, or whose gates failed (the report says which)."""
