"""The bundle manifest as a versioned type, validated on read.

`Manifest.from_dict` is the one reader: it accepts the schema versions it
knows, upgrades older ones to the current one (`_UPGRADES`, the one home of
schema evolution), and checks every field's *type*, not only its presence,
reporting every problem at once. `Manifest.to_dict` is what the one writer
(`edgecore.bundle.write_bundle`) puts on disk.

Schema history:
- 1: round 1. The drift reference was a fixed file name, when present.
- 2: the manifest names its drift reference (``drift_reference``), and a bundle
  holds nothing the manifest does not list (besides the manifest and its
  signature file): readers refuse unlisted files.
- 3: the manifest names its task (``task``: name and parameters, docs/tasks.md);
  older bundles are classification.

Torch-free: the device reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from edgecore.errors import BundleTrustError
from edgecore.spec import InputSpec, Precision
from edgecore.tasks import TaskSpec, task_class, task_names

__all__ = [
    "SCHEMA_VERSION", "SUPPORTED_SCHEMAS", "FileEntry", "ModelInfo", "OutputSpec", "ArtifactInfo", "Routing",
    "Manifest", "ManifestError",
]

SCHEMA_VERSION = 3
SUPPORTED_SCHEMAS = (1, 2, 3)
DRIFT_REFERENCE = "drift_reference.json"


class ManifestError(BundleTrustError):
    """A manifest that does not match its schema (names every bad field)."""


class _Check:
    """Collects type problems as ``manifest.a.b: expected ..., got ...``; raises them all at once."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def get(self, d: Any, key: str, kind: type | tuple[type, ...], where: str, *, optional: bool = False,
            default: Any = None) -> Any:
        if not isinstance(d, dict):
            return default
        if key not in d or (optional and d[key] is None):
            if not optional:
                self.problems.append(f"{where}.{key}: missing")
            return default
        v = d[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
        if ok and isinstance(v, float) and not math.isfinite(v):
            ok = False
        if not ok:
            names = "/".join(dict.fromkeys("number" if k in (int, float) else k.__name__ for k in kinds))
            self.problems.append(f"{where}.{key}: expected {names}, got {type(v).__name__} {_short(v)}")
            return default
        return v

    def number(self, d: Any, key: str, where: str, *, optional: bool = False, default: Any = None) -> Any:
        v = self.get(d, key, (int, float), where, optional=optional, default=default)
        return float(v) if v is not None else v

    def fail(self, where: str, why: str) -> None:
        self.problems.append(f"{where}: {why}")


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class ModelInfo:
    name: str  # the model line
    version: str
    # a monotonically increasing release number per model line (signed with the manifest): a device refuses a
    # lower one than it has run, except a rollback the gateway orders to a bundle it ran before; None: unnumbered
    release: int | None = None


@dataclass(frozen=True)
class OutputSpec:
    name: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class ArtifactInfo:
    """The artifact's main file (or folder) and the runtime that runs it; ``details`` is target-specific."""

    main: str
    runtime: str
    runtime_version: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Routing:
    """How the device decides to ask the cloud: confidence ``measure`` at ``temperature`` below ``threshold``.

    ``info`` keeps what the build measured when it chose them (curve, expected accuracy...).
    """

    measure: str = "max_prob"
    temperature: float = 1.0
    threshold: float = 0.0
    offload_budget: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"measure": self.measure, "temperature": self.temperature, "threshold": self.threshold,
                "offload_budget": self.offload_budget, **self.info}


_MEASURES = ("max_prob", "margin", "entropy")


@dataclass(frozen=True)
class Manifest:
    """Everything a device needs to trust and run a bundle. Build one, then `edgecore.bundle.write_bundle`."""

    model: ModelInfo
    target: str
    precision: Precision
    input: InputSpec
    output: OutputSpec
    artifact: ArtifactInfo
    toolchain_version: str = "unknown"
    created: str = ""
    files: dict[str, FileEntry] = field(default_factory=dict)
    routing: Routing | None = None
    drift_reference: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    verify: dict[str, Any] = field(default_factory=dict)
    task: TaskSpec = field(default_factory=TaskSpec)
    schema_version: int = SCHEMA_VERSION

    @property
    def labels(self) -> tuple[str, ...]:
        return self.output.labels

    def with_files(self, files: dict[str, FileEntry]) -> "Manifest":
        return replace(self, files=dict(files))

    # --- writing -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model": {"name": self.model.name, "version": self.model.version,
                      **({"release": self.model.release} if self.model.release is not None else {})},
            "task": self.task.to_dict(),
            "target": self.target,
            "precision": self.precision.value,
            "toolchain_version": self.toolchain_version,
            "created": self.created,
            "input": self.input.to_dict(),
            "output": {"name": self.output.name, "labels": list(self.output.labels)},
            "artifact": {"main": self.artifact.main, "runtime": self.artifact.runtime,
                         "runtime_version": self.artifact.runtime_version, "details": self.artifact.details},
            "metrics": self.metrics,
            "routing": self.routing.to_dict() if self.routing is not None else None,
            "drift_reference": self.drift_reference,
            "calibration": self.calibration,
            "lineage": self.lineage,
            "verify": self.verify,
            "files": {k: v.to_dict() for k, v in sorted(self.files.items())},
        }

    # --- reading -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Any, *, where: str = "manifest") -> "Manifest":
        """Validate and upgrade a parsed ``manifest.json``; raises `ManifestError` naming every bad field."""
        if not isinstance(raw, dict):
            raise ManifestError(f"{where}: manifest is not a JSON object")
        version = raw.get("schema_version")
        if isinstance(version, bool) or version not in SUPPORTED_SCHEMAS:
            raise ManifestError(
                f"{where}: unknown bundle schema version {_short(version)} (this reader knows "
                f"{list(SUPPORTED_SCHEMAS)}); rebuild the bundle or update the agent"
            )
        d = dict(raw)
        for v in range(int(version), SCHEMA_VERSION):
            d = _UPGRADES[v](d)
        c = _Check()
        m = cls(
            model=_model(c, d), target=c.get(d, "target", str, "manifest", default=""),
            precision=_precision(c, d), input=_input(c, d), output=_output(c, d), artifact=_artifact(c, d),
            toolchain_version=c.get(d, "toolchain_version", str, "manifest", optional=True, default="unknown"),
            created=c.get(d, "created", str, "manifest", optional=True, default=""),
            files=_files(c, d), routing=_routing(c, d),
            drift_reference=c.get(d, "drift_reference", str, "manifest", optional=True),
            metrics=c.get(d, "metrics", dict, "manifest", optional=True, default={}),
            calibration=c.get(d, "calibration", dict, "manifest", optional=True),
            lineage=c.get(d, "lineage", dict, "manifest", optional=True, default={}),
            verify=c.get(d, "verify", dict, "manifest", optional=True, default={}),
            task=_task(c, d),
        )
        if m.drift_reference is not None and m.drift_reference not in m.files:
            c.fail("manifest.drift_reference", f"{m.drift_reference!r} is not listed in files")
        if m.artifact.main and not any(n == m.artifact.main or n.startswith(m.artifact.main.rstrip("/") + "/")
                                       for n in m.files):
            c.fail("manifest.artifact.main", f"{m.artifact.main!r} is not listed in files")
        if c.problems:
            raise ManifestError(f"{where}: " + "; ".join(c.problems))
        return m


def _model(c: _Check, d: dict[str, Any]) -> ModelInfo:
    m = c.get(d, "model", dict, "manifest", default={})
    version = c.get(m, "version", (str, int), "manifest.model", optional=True, default="unknown")
    release = m.get("release")
    if release is not None and (isinstance(release, bool) or not isinstance(release, int) or not 0 <= release < 2**63):
        c.fail("manifest.model.release", f"expected an integer release number >= 0, got {_short(release)}")
        release = None
    return ModelInfo(name=c.get(m, "name", str, "manifest.model", default=""), version=str(version), release=release)


def _precision(c: _Check, d: dict[str, Any]) -> Precision:
    p = c.get(d, "precision", str, "manifest", default="fp32")
    try:
        return Precision(p)
    except ValueError:
        c.fail("manifest.precision", f"unknown precision {_short(p)} (fp32, fp16, int8)")
        return Precision.FP32


RESIZE_MODES = ("stretch", "letterbox")


def _input(c: _Check, d: dict[str, Any]) -> InputSpec:
    i = c.get(d, "input", dict, "manifest", default={})
    shape = c.get(i, "shape", list, "manifest.input", default=[None])
    if not shape or any(not (s is None or (isinstance(s, int) and not isinstance(s, bool) and 0 < s < 2**31))
                        for s in shape) or any(s is None for s in shape[1:]):
        c.fail("manifest.input.shape", f"expected [batch, positive ints...], got {_short(shape)}")
        shape = [None]
    pre = c.get(i, "preprocess", dict, "manifest.input", optional=True, default={})
    mean = c.get(pre, "mean", list, "manifest.input.preprocess", optional=True, default=[])
    std = c.get(pre, "std", list, "manifest.input.preprocess", optional=True, default=[])
    nums = [v for v in (*mean, *std) if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)]
    if nums or len(mean) != len(std) or any(v == 0 for v in std):
        c.fail("manifest.input.preprocess", "mean and std must be finite numbers of equal length, std non-zero")
        mean, std = [], []
    resize = c.get(pre, "resize", str, "manifest.input.preprocess", optional=True, default="stretch")
    if resize not in RESIZE_MODES:
        c.fail("manifest.input.preprocess.resize", f"unknown resize {_short(resize)} ({', '.join(RESIZE_MODES)})")
        resize = "stretch"
    pad_value = c.number(pre, "pad_value", "manifest.input.preprocess", optional=True, default=114.0)
    dtype = c.get(i, "dtype", str, "manifest.input", optional=True, default="float32")
    if dtype not in ("float32", "float16", "uint8", "int8"):
        c.fail("manifest.input.dtype", f"unsupported dtype {_short(dtype)}")
        dtype = "float32"
    return InputSpec(
        name=c.get(i, "name", str, "manifest.input", default="input"), shape=tuple(shape), dtype=dtype,
        layout=c.get(i, "layout", str, "manifest.input", optional=True, default="NCHW"),
        scale=c.number(pre, "scale", "manifest.input.preprocess", optional=True, default=1.0),
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std), resize=resize,
        pad_value=float(pad_value),
    )


def _output(c: _Check, d: dict[str, Any]) -> OutputSpec:
    o = c.get(d, "output", dict, "manifest", default={})
    labels = c.get(o, "labels", list, "manifest.output", default=[])
    if not labels or not all(isinstance(x, str) for x in labels):
        c.fail("manifest.output.labels", "expected a non-empty list of strings")
        labels = []
    return OutputSpec(name=c.get(o, "name", str, "manifest.output", optional=True, default="logits"),
                      labels=tuple(labels))


def _artifact(c: _Check, d: dict[str, Any]) -> ArtifactInfo:
    a = c.get(d, "artifact", dict, "manifest", default={})
    return ArtifactInfo(
        main=c.get(a, "main", str, "manifest.artifact", default=""),
        runtime=c.get(a, "runtime", str, "manifest.artifact", optional=True, default=""),
        runtime_version=c.get(a, "runtime_version", str, "manifest.artifact", optional=True),
        details=c.get(a, "details", dict, "manifest.artifact", optional=True, default={}),
    )


def _files(c: _Check, d: dict[str, Any]) -> dict[str, FileEntry]:
    files = c.get(d, "files", dict, "manifest", default={})
    out: dict[str, FileEntry] = {}
    for name, e in files.items():
        where = f"manifest.files[{_short(name)}]"
        size = c.get(e, "size", int, where)
        sha = c.get(e, "sha256", str, where)
        if not isinstance(e, dict):
            c.fail(where, "expected an object with size and sha256")
        elif size is not None and sha is not None:
            if size < 0 or len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
                c.fail(where, "size must be >= 0 and sha256 64 lowercase hex digits")
            else:
                out[name] = FileEntry(size=size, sha256=sha)
    return out


def _routing(c: _Check, d: dict[str, Any]) -> Routing | None:
    r = c.get(d, "routing", dict, "manifest", optional=True)
    if not r:  # round-1 bench bundles wrote {}: no routing block
        return None
    measure = c.get(r, "measure", str, "manifest.routing", optional=True, default="max_prob")
    if measure not in _MEASURES:
        c.fail("manifest.routing.measure", f"unknown measure {_short(measure)} ({', '.join(_MEASURES)})")
    temperature = c.number(r, "temperature", "manifest.routing", optional=True, default=1.0)
    if temperature is not None and temperature <= 0:
        c.fail("manifest.routing.temperature", "must be > 0")
    known = {"measure", "temperature", "threshold", "offload_budget"}
    return Routing(
        measure=measure, temperature=temperature or 1.0,
        threshold=c.number(r, "threshold", "manifest.routing", optional=True, default=0.0),
        offload_budget=c.number(r, "offload_budget", "manifest.routing", optional=True),
        info={k: v for k, v in r.items() if k not in known},
    )


def _task(c: _Check, d: dict[str, Any]) -> TaskSpec:
    t = c.get(d, "task", dict, "manifest", default={})
    name = c.get(t, "name", str, "manifest.task", default="")
    params = c.get(t, "params", dict, "manifest.task", optional=True, default={})
    if name and name not in task_names():
        c.fail("manifest.task.name", f"unknown task {_short(name)} (this reader knows {', '.join(task_names())}); "
                                     "update the agent")
    elif name:
        for problem in task_class(name).check_params(params):
            c.fail("manifest.task.params", problem)
    return TaskSpec(name=name or "classify", params=dict(params))


def _upgrade_1_to_2(d: dict[str, Any]) -> dict[str, Any]:
    files = d["files"] if isinstance(d.get("files"), dict) else {}
    return {**d, "schema_version": 2, "drift_reference": DRIFT_REFERENCE if DRIFT_REFERENCE in files else None}


def _upgrade_2_to_3(d: dict[str, Any]) -> dict[str, Any]:
    return {**d, "schema_version": 3, "task": {"name": "classify", "params": {}}}


_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _upgrade_1_to_2, 2: _upgrade_2_to_3}
