"""The ``jetson`` target: ONNX + recipe in the bundle, engine built on the device."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecore.errors import BuildError, TargetUnavailableError
from edgecore.fsutil import atomic_write_json
from edgecore.spec import InputSpec, Precision

from ..base import (
    Artifact,
    ArtifactInfo,
    ModelSource,
    Proxy,
    Runner,
    Target,
)
from .recipe import check_onnx_for_tensorrt, make_recipe

if TYPE_CHECKING:  # pragma: no cover
    from edgecore.representative import RepresentativeSet

MODEL_FILE = "model.onnx"
RECIPE_FILE = "trt_recipe.json"


def _import_trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TargetUnavailableError(
            f"tensorrt is not installed ({e}); pip install 'edge-toolchain[agent-tensorrt]' (the tensorrt-cu12 "
            "wheels, from the package index; needs an NVIDIA GPU)"
        ) from e
    return trt


class JetsonTarget(Target):
    name = "jetson"
    precisions = (Precision.FP32, Precision.FP16, Precision.INT8)
    runtime = "tensorrt"
    install_hint = "pip install 'edge-toolchain[agent-tensorrt]' (tensorrt-cu12 from the package index; needs an NVIDIA GPU)"
    description = "TensorRT on NVIDIA Jetson / GPUs (engine built on the device)"

    def available(self) -> tuple[bool, str]:
        from importlib.util import find_spec

        if find_spec("tensorrt") is None:
            return False, f"tensorrt is not installed; {self.install_hint}"
        try:
            from .engine import gpu_model

            gpu = gpu_model()
        except Exception as e:
            return False, f"no usable NVIDIA GPU: {e}"
        return True, f"tensorrt {self.runtime_version()} on {gpu}"

    def build_available(self) -> tuple[bool, str]:
        try:
            import onnx  # noqa: F401
        except ImportError as e:
            return False, f"onnx is not installed ({e}); pip install onnx"
        return True, "bundles need only onnx here; the engine is built on the device"

    def build(
        self, source: ModelSource, precision: Precision, calibration: "RepresentativeSet | None", out_dir: Path
    ) -> Artifact:
        from .._onnx_clean import clean_onnx

        dst = Path(out_dir) / MODEL_FILE
        details: dict[str, Any] = {}
        recipe = make_recipe(onnx_file=MODEL_FILE, precision=precision, spec=source.input_spec)
        if precision is not Precision.INT8:
            details["cleanup"] = clean_onnx(Path(source.onnx_fp32), dst)
            details["method"] = "fp32 onnx; TensorRT lowers precision at engine build"
        else:
            qat_problem = None
            if source.onnx_qdq is not None and Path(source.onnx_qdq).is_file():
                details["cleanup"] = clean_onnx(Path(source.onnx_qdq), dst)
                try:
                    check_onnx_for_tensorrt(dst, precision=precision, recipe=recipe)
                    details.update(method="qat-qdq", weight_bits=source.qdq_weight_bits)
                except BuildError as e:
                    qat_problem = str(e).split(": not buildable by TensorRT", 1)[-1].lstrip(" 0123456789.:")
            if "method" not in details:
                if calibration is None:
                    raise BuildError("jetson int8 without a TensorRT-compatible QDQ graph needs a calibration set")
                from ..onnx_target import static_quantize_onnx

                clean = dst.with_name("fp32.clean.onnx")
                try:
                    details["cleanup"] = clean_onnx(Path(source.onnx_fp32), clean)
                    # TensorRT takes symmetric int8 with full 8-bit weights (no VNNI limit on GPUs)
                    # Q/DQ only around the compute layers, the placement TensorRT recommends
                    details.update(static_quantize_onnx(
                        clean, dst, calibration, input_name=source.input_spec.name, reduce_range=False,
                        op_types=["Conv", "Gemm", "MatMul", "ConvTranspose"], symmetric_activations=True))
                finally:
                    clean.unlink(missing_ok=True)
                details.update(method="ort-static-ptq-qdq (symmetric)", weight_bits=8)
                if qat_problem:
                    details["qat_qdq_rejected"] = qat_problem
        details["tensorrt_check"] = check_onnx_for_tensorrt(dst, precision=precision, recipe=recipe)
        atomic_write_json(Path(out_dir) / RECIPE_FILE, recipe)
        details["recipe"] = RECIPE_FILE
        details["trtexec"] = recipe["trtexec"]
        return Artifact(target=self.name, precision=precision, files=[MODEL_FILE, RECIPE_FILE], runtime=self.runtime, details=details)

    def load(self, bundle_dir: Path, artifact: ArtifactInfo, input_spec: InputSpec, *,
             threads: int | None = None) -> Runner:
        import json

        from .engine import EngineCache
        from .runner import TrtRunner

        trt = _import_trt()
        root = Path(bundle_dir)
        recipe = json.loads((root / artifact.details.get("recipe", RECIPE_FILE)).read_text())
        engine, _built = EngineCache(trt=trt).get(root / recipe["onnx"], recipe)
        return TrtRunner(engine, input_name=recipe["input"], trt=trt)

    def proxy(self, bundle_dir: Path, artifact: ArtifactInfo, precision: Precision, source: ModelSource | None) -> Proxy:
        """The bundle's graph on ONNX Runtime (CPU) under the recipe's precision (`proxy.jetson_proxy`)."""
        import json

        from .proxy import jetson_proxy

        root = Path(bundle_dir)
        recipe = json.loads((root / artifact.details.get("recipe", RECIPE_FILE)).read_text())
        return jetson_proxy(root / recipe["onnx"], Precision(recipe["precision"]))
