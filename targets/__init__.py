"""Deployment targets, found through one registry.

Built-in targets map names to dotted paths and are imported on demand, so
naming a target never imports another target's converter or runtime.
Third-party targets register under the ``edge_toolchain.targets`` entry-point
group (``name = "package.module:TargetClass"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgecore.errors import TargetUnavailableError, UnknownTargetError
from edgecore.plugins import load, registry
from edgecore.spec import Precision

from .base import Artifact, ModelSource, OneInput, Runner, Target, one_input

if TYPE_CHECKING:  # pragma: no cover
    from edgecore.bundle import Bundle

__all__ = [
    "Artifact",
    "ModelSource",
    "Runner",
    "OneInput",
    "one_input",
    "Target",
    "get_target",
    "target_names",
    "parse_precision",
    "load_runner",
]

ENTRY_POINT_GROUP = "edge_toolchain.targets"

BUILTIN: dict[str, str] = {
    "onnx": "targets.onnx_target:OnnxTarget",
    "openvino": "targets.openvino_target:OpenVinoTarget",
    "tflite": "targets.tflite_target:TfliteTarget",
    "coreml": "targets.coreml_target:CoreMLTarget",
    "jetson": "targets.jetson.target:JetsonTarget",
}


def _registry() -> dict[str, str]:
    return registry(ENTRY_POINT_GROUP, BUILTIN)


def target_names() -> list[str]:
    return list(_registry())


def get_target(name: str) -> Target:
    """The target called ``name``; an unknown name lists the known ones."""
    reg = _registry()
    if name not in reg:
        raise UnknownTargetError(f"unknown target {name!r}; available: {', '.join(reg)}")
    return load(reg[name])()


def parse_precision(target: Target, precision: str) -> Precision:
    """``precision`` as a `Precision` the target supports, or a clear error."""
    try:
        p = Precision(precision)
    except ValueError as e:
        raise UnknownTargetError(
            f"unknown precision {precision!r}; choose from {', '.join(x.value for x in Precision)}"
        ) from e
    if p not in target.precisions:
        raise UnknownTargetError(
            f"target {target.name!r} does not support {p.value}; it supports "
            f"{', '.join(x.value for x in target.precisions)}"
        )
    return p


def load_runner(bundle: "Bundle", *, threads: int | None = None) -> Runner:
    """Load a verified bundle's artifact with this device's runtime (refuses if it is missing)."""
    target = get_target(bundle.target)
    ok, why = target.available()
    if not ok:
        raise TargetUnavailableError(
            f"bundle {bundle.root} is for target {bundle.target!r}, which this device cannot run: {why}"
        )
    return target.load(Path(bundle.root), bundle.manifest.artifact, bundle.input_spec, threads=threads)
