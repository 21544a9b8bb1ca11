"""Meta-tests: every registered target has a contract test; the registry's errors are clear."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import tests.targets as pkg
from edgecore.errors import UnknownTargetError
from targets import get_target, target_names
from tests.targets.contract import TargetContract


def _contract_targets() -> set[str]:
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("test_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    found: set[str] = set()
    stack = list(TargetContract.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if getattr(cls, "target_name", None):
            found.add(cls.target_name)
    return found


def test_every_registered_target_has_a_contract_test() -> None:
    missing = set(target_names()) - _contract_targets()
    assert not missing, f"registered targets without a TargetContract subclass in tests/targets: {sorted(missing)}"


def test_unknown_target_lists_known_ones() -> None:
    with pytest.raises(UnknownTargetError, match="unknown target 'nope'; available: onnx, openvino"):
        get_target("nope")


def test_entry_point_targets_are_found(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    import targets as registry

    ep = metadata.EntryPoint(name="thirdparty", value="targets.onnx_target:OnnxTarget", group=registry.ENTRY_POINT_GROUP)
    real = metadata.entry_points

    def fake(**kw):  # type: ignore[no-untyped-def]
        return [ep] if kw.get("group") == registry.ENTRY_POINT_GROUP else real(**kw)

    from edgecore import plugins

    monkeypatch.setattr(metadata, "entry_points", fake)
    plugins._installed.cache_clear()  # each group is read once per process: read it again with the fake
    try:
        assert "thirdparty" in registry.target_names()
        assert registry.get_target("thirdparty").name == "onnx"
    finally:
        plugins._installed.cache_clear()
