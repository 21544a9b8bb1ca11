"""The target interface: one small unit per deployment runtime.

A target has a name, the precisions it supports, ``available()`` (can this
machine *run* its artifacts, and if not why), ``build_available()`` (can this
machine *build* them), ``build(...)`` (cloud side: converter imports live
inside it) and ``load(...)`` (device side: imports only its runtime) returning
a `Runner` with one ``run(batch) -> logits`` call.

This module imports numpy and the standard library only: the device agent
imports it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, NamedTuple, Protocol

import numpy as np

from edgecore.manifest import ArtifactInfo
from edgecore.spec import InputSpec, Precision

if TYPE_CHECKING:  # pragma: no cover
    from edgecore.representative import RepresentativeSet


@dataclass(frozen=True)
class ModelSource:
    """What a target builds from: the exported ONNX and the PyTorch student.

    Some converters start from ONNX (ORT, OpenVINO, TensorRT), others from
    PyTorch (LiteRT, CoreML). ``torch_model`` is a zero-argument loader returning
    the fp32 student in eval mode (lazy, so device code never touches torch).
    """

    name: str
    input_spec: InputSpec
    labels: tuple[str, ...]
    onnx_fp32: Path
    onnx_qdq: Path | None = None  # explicitly quantized graph from the QAT student
    torch_model: Callable[[], Any] | None = None
    qdq_weight_bits: int | None = None  # 7 when weights were reduced-range for non-VNNI CPUs


@dataclass
class Artifact:
    """What ``build`` produced: files relative to ``out_dir``, the main one first."""

    target: str
    precision: Precision
    files: list[str]
    runtime: str  # the runtime package that runs it, e.g. "onnxruntime"
    details: dict[str, Any] = field(default_factory=dict)  # recipe, quant method...

    @property
    def main(self) -> str:
        return self.files[0]

    def info(self, runtime_version: str | None = None) -> ArtifactInfo:
        """What the manifest (and ``Target.load``) says of this artifact; ``runtime_version`` is the target's
        ``runtime_version()`` where the artifact was built."""
        return ArtifactInfo(main=self.main, runtime=self.runtime, runtime_version=runtime_version,
                            details=self.details)


class Runner(Protocol):
    """A loaded artifact: one call, normalised float batch in, logits out.

    A runner may also offer ``one_input(spec) -> OneInput | None``: a path for one raw sample with the spec's
    preprocessing folded into its own input conversion (see `one_input`).
    """

    def run(self, batch: np.ndarray) -> np.ndarray: ...


class OneInput(NamedTuple):
    """A device's usual call, one raw sample: ``run(raw) -> row``, the output row as a Python list.

    ``raw`` has the spec's sample shape (no batch dimension) and any numeric dtype; the preprocessing is part of
    ``run``. ``quant = (scale, qmin, qmax)`` when the row holds the output's integers (logits are
    ``(q - zero) * scale``), so a scorer can read them without dequantizing (`edgecore.confidence.row_scorer`).
    """

    run: Callable[[np.ndarray], list]
    quant: tuple[float, int, int] | None = None


def one_input(runner: Runner, spec: InputSpec, *, own: bool = True) -> OneInput:
    """The runner's own `OneInput` path when it has one (and ``own``), else ``runner.run`` on `InputSpec.preprocess`.

    Why: on a device the per-input numpy calls around a tiny model cost a third of the model; a runner that
    quantizes its input can fold ``raw * a + b`` into that quantization, one that takes floats saves the copies.
    """
    make = getattr(runner, "one_input", None) if own else None
    got = make(spec) if make is not None else None
    if got is not None:
        return got
    run, preprocess = runner.run, spec.preprocess
    return OneInput(lambda raw: run(preprocess(raw[None]))[0].tolist())


@dataclass(frozen=True)
class Proxy:
    """A stand-in for a target's runtime where it is absent: what to run and what it is.

    ``runner`` evaluates the artifact (or the exact reproduction of its
    compression) up to the hardware boundary; ``runtime`` names what runs it
    (e.g. "onnxruntime 1.20 CPUExecutionProvider"); ``evaluates`` says what is
    modelled and ``not_modelled`` what only the real runtime can tell.
    ``unverified`` says why, when the proxy cannot look inside the artifact
    (it evaluates a reproduction instead); verify then records status
    ``unverified``, never ``proxy``.
    """

    runner: Runner
    runtime: str
    evaluates: str
    not_modelled: str
    unverified: str = ""

    def describe(self) -> dict[str, str]:
        d = {"runtime": self.runtime, "evaluates": self.evaluates, "not_modelled": self.not_modelled}
        if self.unverified:
            d["unverified"] = self.unverified
        return d


TORCH_HINT = "pip install 'edge-toolchain[toolchain]'"


def first_missing(*modules: tuple[str, str]) -> str | None:
    """``(module, how to install it)`` pairs -> why the first missing one is missing, or None.

    Checks importability without importing (converters are heavy).
    """
    from importlib.util import find_spec

    for module, hint in modules:
        if find_spec(module) is None:
            return f"{module.replace('_', '-')} is not installed; {hint}"  # the package name users install
    return None


class Target(abc.ABC):
    """Base of every target. Subclasses set the class variables and the four calls."""

    name: ClassVar[str]
    precisions: ClassVar[tuple[Precision, ...]]
    runtime: ClassVar[str]  # package that runs artifacts, named in "install ..." errors
    install_hint: ClassVar[str]  # e.g. "pip install 'edge-toolchain[openvino]'"
    description: ClassVar[str] = ""

    @abc.abstractmethod
    def available(self) -> tuple[bool, str]:
        """Can this machine run (load + verify) this target's artifacts? (ok, reason)."""

    @abc.abstractmethod
    def build_available(self) -> tuple[bool, str]:
        """Can this machine build this target's artifacts? (ok, reason)."""

    @abc.abstractmethod
    def build(
        self,
        source: ModelSource,
        precision: Precision,
        calibration: "RepresentativeSet | None",
        out_dir: Path,
    ) -> Artifact:
        """Write the artifact's files into ``out_dir``. Heavy imports go inside."""

    @abc.abstractmethod
    def load(self, bundle_dir: Path, artifact: ArtifactInfo, input_spec: InputSpec, *,
             threads: int | None = None) -> Runner:
        """Load the artifact of a verified bundle (its manifest's typed parts) and return its runner."""

    def proxy(self, bundle_dir: Path, artifact: ArtifactInfo, precision: Precision,
              source: ModelSource | None) -> Proxy | None:
        """A proxy evaluation of a built artifact for machines without the target's runtime, or None.

        Build side (may import converters and torch). ``source`` is the model
        the bundle was built from, when known. Targets whose runtime runs
        anywhere have no proxy: they are verified for real.
        """
        return None

    def runtime_version(self) -> str | None:
        """Version of the runtime package, for manifests and bench records."""
        from importlib import metadata

        try:
            return metadata.version(self.runtime)
        except metadata.PackageNotFoundError:
            return None
