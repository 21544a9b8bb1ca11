"""``coreml``: a Core ML ML-program package (``model.mlpackage/``) built with coremltools.

Built here from the traced PyTorch student (``torch.jit.trace``; coremltools 9
converts torch 2.13 programs with a version warning). fp16 is the ML program's
compute precision; int8 quantizes the weights (``coremltools.optimize``,
linear symmetric, every weight tensor) on top of an fp16 program. Prediction
needs the Core ML framework, i.e. macOS: elsewhere `available()` says so and
the build is checked structurally instead (`check_structure`): ML-program
type, the input name/shape range, the logits output, and for int8 that the
weights really are stored quantized; and its accuracy is measured on a proxy
that executes the package's own ML program in PyTorch (`targets.coreml_proxy`).
"""

from __future__ import annotations

import logging
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecore.errors import BuildError
from edgecore.spec import InputSpec, Precision

from .base import (
    TORCH_HINT,
    Artifact,
    ArtifactInfo,
    ModelSource,
    Proxy,
    Runner,
    Target,
    first_missing,
)
from .coreml_proxy import WeightCompression

if TYPE_CHECKING:  # pragma: no cover
    from edgecore.representative import RepresentativeSet

PACKAGE = "model.mlpackage"
MAX_BATCH = 1024


class _ExpectedOffMacos(logging.Filter):
    """Drops coremltools' warnings that say nothing new off macOS: its native proxies fail to load there (Core ML
    prediction needs macOS, as `CoreMLTarget.available` says), and it checks scikit-learn's version for a
    converter this project does not use. Its other warnings (an untested torch version) still show."""

    EXPECTED = ("Failed to load _ML", "scikit-learn version")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.EXPECTED)


if sys.platform != "darwin":  # on macOS a proxy that fails to load is a real problem: keep it
    logging.getLogger("coremltools").addFilter(_ExpectedOffMacos())


class CoreMLRunner:
    def __init__(self, path: Path, *, input_name: str, output_name: str) -> None:
        import coremltools as ct

        self.model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.ALL)
        self.input_name, self.output_name = input_name, output_name

    def run(self, batch: np.ndarray) -> np.ndarray:
        out = self.model.predict({self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.asarray(out[self.output_name], dtype=np.float32)


def check_structure(path: Path, *, input_name: str, sample_shape: tuple[int, ...], precision: Precision) -> dict[str, Any]:
    """What can be checked without Core ML itself; raises `BuildError` listing every problem."""
    import coremltools as ct

    try:
        spec = ct.utils.load_spec(str(path))
    except Exception as e:
        raise BuildError(f"{path}: not a loadable Core ML package ({e})") from e
    problems: list[str] = []
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        problems.append(f"model type is {kind}, expected mlProgram")
    inputs = {i.name: i for i in spec.description.input}
    outputs = [o.name for o in spec.description.output]
    if input_name not in inputs:
        problems.append(f"input {input_name!r} missing (has {list(inputs)})")
    else:
        arr = inputs[input_name].type.multiArrayType
        ranges = [(r.lowerBound, r.upperBound) for r in arr.shapeRange.sizeRanges]
        tail = tuple(lo for lo, _ in ranges[1:]) if ranges else tuple(arr.shape[1:])
        if tail != tuple(sample_shape):
            problems.append(f"input sample shape {tail} != {tuple(sample_shape)}")
    if outputs != ["logits"]:
        problems.append(f"outputs {outputs} != ['logits']")
    all_ops = [op for f in spec.mlProgram.functions.values() for b in f.block_specializations.values()
               for op in b.operations]
    ops = [op.type for op in all_ops]
    dequant = sum(t.startswith("constexpr_") for t in ops)
    compute_ops = [op for op in all_ops if op.type in ("conv", "linear", "matmul")]
    compute = len(compute_ops)
    # every conv/linear weight must come out of a constexpr (stored quantized): one weight may feed several ops
    # (a detector's head convolutions, shared by the pyramid levels), so count the ops, not the weights
    made_by = {out.name: op.type for op in all_ops for out in op.outputs}
    float_weights = [
        op.type for op in compute_ops
        if "weight" in op.inputs and op.inputs["weight"].arguments
        and not made_by.get(op.inputs["weight"].arguments[0].name, "").startswith("constexpr_")
    ]
    if precision is Precision.INT8 and (float_weights or dequant == 0):
        problems.append(f"only {compute - len(float_weights)} of {compute} conv/linear weights are stored quantized")
    if problems:
        raise BuildError(f"{path}: Core ML structural check failed: " + "; ".join(problems))
    return {
        "spec_version": int(spec.specificationVersion),
        "ops": len(ops),
        "quantized_weights": dequant,
        "compute_ops": compute,
    }


def _torch_attention_hint(model: Any) -> str:
    """Why a conversion of torch's own attention fails, and the way out (empty without it)."""
    import torch

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    if not names:
        return ""
    return (f"; layer {names[0]!r} is torch.nn.MultiheadAttention, which coremltools cannot convert (its fused "
            "fast path has no converter, its unfused form casts shapes it cannot read): build from the student "
            "`toolchain compress` writes, which has it replaced by plain q/k/v layers (toolchain.attention)")


class CoreMLTarget(Target):
    name = "coreml"
    precisions = (Precision.FP32, Precision.FP16, Precision.INT8)
    runtime = "coremltools"
    install_hint = "pip install 'edge-toolchain[coreml]'  (coremltools; prediction needs macOS)"
    description = "Core ML ML program for Apple devices (prediction on macOS only)"
    int8_compression: WeightCompression = WeightCompression()  # what linear_quantize_weights gets for int8

    def available(self) -> tuple[bool, str]:
        if sys.platform != "darwin":
            return False, f"Core ML prediction needs macOS (this is {platform.system()}); bundles build and are checked structurally here"
        try:
            import coremltools as ct
        except ImportError as e:
            return False, f"coremltools is not installed ({e}); on a device: pip install 'edge-toolchain[agent-coreml]'; to build: {self.install_hint}"
        return True, f"coremltools {ct.__version__} on macOS {platform.mac_ver()[0]}"

    def build_available(self) -> tuple[bool, str]:
        missing = first_missing(("coremltools", self.install_hint), ("torch", TORCH_HINT))
        return (False, missing) if missing else (True, f"coremltools {self.runtime_version()}")

    def build(
        self, source: ModelSource, precision: Precision, calibration: "RepresentativeSet | None", out_dir: Path
    ) -> Artifact:
        import coremltools as ct
        import torch

        if source.torch_model is None:
            raise BuildError("coreml builds from the PyTorch student, but the model source has none")
        model = source.torch_model().eval()
        shape = source.input_spec.sample_shape
        example = torch.zeros((1, *shape), dtype=torch.float32)
        out = Path(out_dir) / PACKAGE
        try:
            from ._torch_build import no_fused_attention

            with torch.no_grad(), no_fused_attention():
                traced = torch.jit.trace(model, example)
            mlmodel = ct.convert(
                traced,
                inputs=[ct.TensorType(name=source.input_spec.name, shape=(ct.RangeDim(1, MAX_BATCH, 1), *shape), dtype=np.float32)],
                outputs=[ct.TensorType(name="logits")],
                convert_to="mlprogram",
                compute_precision=ct.precision.FLOAT32 if precision is Precision.FP32 else ct.precision.FLOAT16,
                minimum_deployment_target=ct.target.iOS16,
            )
            if precision is Precision.INT8:
                from coremltools.optimize.coreml import linear_quantize_weights

                mlmodel = linear_quantize_weights(mlmodel, config=self.int8_compression.coreml_config())
            mlmodel.save(str(out))
        except BuildError:
            raise
        except Exception as e:
            raise BuildError(f"Core ML conversion ({precision}) failed: {e}{_torch_attention_hint(model)}") from e
        structure = check_structure(out, input_name=source.input_spec.name, sample_shape=shape, precision=precision)
        details = {
            "method": {Precision.FP32: "mlprogram fp32", Precision.FP16: "mlprogram fp16",
                       Precision.INT8: f"{self.int8_compression.dtype} weights ({self.int8_compression.mode}) on fp16",
                       }[precision],
            "input_name": source.input_spec.name,
            "output_name": "logits",
            "structure": structure,
        }
        if precision is Precision.INT8:
            details["compression"] = self.int8_compression.to_dict()
        return Artifact(target=self.name, precision=precision, files=[PACKAGE], runtime=self.runtime, details=details)

    def load(self, bundle_dir: Path, artifact: ArtifactInfo, input_spec: InputSpec, *,
             threads: int | None = None) -> Runner:
        d = artifact.details
        return CoreMLRunner(
            Path(bundle_dir) / artifact.main,
            input_name=d.get("input_name", input_spec.name),
            output_name=d.get("output_name", "logits"),
        )

    def proxy(self, bundle_dir: Path, artifact: ArtifactInfo, precision: Precision, source: ModelSource | None) -> Proxy:
        """The package's own ML program run op by op (`coreml_proxy`); unverified when it cannot be run here."""
        from .coreml_proxy import coreml_proxy

        student = source.torch_model() if source is not None and source.torch_model is not None else None
        return coreml_proxy(Path(bundle_dir) / artifact.main, precision, student=student,
                            compression=WeightCompression.from_dict(artifact.details.get("compression")))
