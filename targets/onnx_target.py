"""``onnx``: ONNX Runtime, the generic CPU target.

fp32 ships the exported student ONNX. int8 ships a QDQ graph: the QAT
student's own (``ModelSource.onnx_qdq``) when the pipeline made one, since it
was trained with its quantization; otherwise post-training static
quantization (`onnxruntime.quantization`, QDQ, per-channel weights) calibrated
on the run's representative set. Weights are reduced to 7 bits
(``reduce_range``) because ORT's int8 kernels on CPUs without VNNI saturate
in the u8*s8 multiply-add with full 8-bit weights.

Activations are uint8 (asymmetric): ORT's CPU kernels fuse uint8 Q/DQ groups
into QLinearConv / QLinearAdd / QGemm, while with int8 activations its
optimizer leaves convolutions and adds in fp32 and int8 runs slower than fp32.
A QDQ source with int8 activations is rewritten to uint8 (exact, see
`targets._qdq`). The artifact details record the scheme and what ORT's
optimizer left in float (``ort_graph``). TensorRT (``jetson``) keeps its
symmetric int8 recipe.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecore.errors import BuildError
from edgecore.spec import InputSpec, Precision

from .base import (
    Artifact,
    ArtifactInfo,
    ModelSource,
    Runner,
    Target,
)

if TYPE_CHECKING:  # pragma: no cover
    from edgecore.representative import RepresentativeSet

MODEL_FILE = "model.onnx"
log = logging.getLogger(__name__)


def _check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # onnx raises several checker error types
        raise BuildError(f"{path}: invalid ONNX model ({' '.join(str(e).split())})") from e


def static_quantize_onnx(
    src: Path, dst: Path, calibration: "RepresentativeSet", *, input_name: str = "input", reduce_range: bool = True,
    op_types: list[str] | None = None, symmetric_activations: bool = False,
) -> dict[str, Any]:
    """Post-training static QDQ quantization of ``src`` into ``dst`` with the representative set.

    Activations are uint8 affine (what ORT's CPU kernels fuse) unless ``symmetric_activations``
    (int8, zero point 0: TensorRT's explicit quantization). ORT's ``quant_pre_process`` (ONNX shape
    inference, basic graph optimisations) runs first; where it fails (its opset upgrade has no adapter for
    an opset-9 ``Upsample``, for one) the graph is quantized as it is, with a warning, and the returned
    details (for the artifact's) say so: ``{"pre_process": "failed: ..."}``, else ``{"pre_process": "applied"}``.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from targets.calibration_data import ort_data_reader

    real_input = onnx.load(str(src), load_external_data=False).graph.input[0].name or input_name
    pre = dst.with_name(dst.stem + ".pre.onnx")
    details: dict[str, Any] = {"pre_process": "applied"}
    try:
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception as e:  # pre-processing is an optimisation: quantize the graph as it is, and say so
            why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            details["pre_process"] = f"failed: {why}"
            log.warning("%s: onnxruntime's quant_pre_process failed (%s); quantizing the graph without it "
                        "(no shape inference or graph optimisation before quantization)", src.name, why)
            shutil.copyfile(src, pre)
        quantize_static(
            str(pre),
            str(dst),
            ort_data_reader(calibration, input_name=real_input),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=reduce_range,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=op_types,
            extra_options={"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True},
        )
    except BuildError:
        raise
    except Exception as e:
        raise BuildError(f"ONNX Runtime static quantization of {src} failed: {e}") from e
    finally:
        pre.unlink(missing_ok=True)
    return details


def _int8_rewrites(path: Path, *, to_uint8: bool) -> dict[str, Any]:
    """The int8 graph at ``path`` rewritten for ORT's kernels, each rewrite exact, loaded and saved once; returns
    what each did and the scheme of the result.

    ``to_uint8``: int8 activation Q/DQ pairs become uint8 (a QAT source; PTQ writes uint8 itself). Then zero input
    channels for convolutions that ORT's fast x86 kernel skips for their channel count, the global average
    pool quantized instead of left in float, windowed average pools run as depthwise convolutions, and
    HardSigmoids (hardswish) as quantized adds.
    """
    import onnx

    from ._qdq import (
        activations_to_uint8,
        average_pool_as_depthwise_conv,
        hard_sigmoid_as_add,
        pad_conv_input_channels,
        qdq_scheme,
        quantize_global_pool,
    )

    model = onnx.load(str(path))
    done: dict[str, Any] = {"uint8_rewrite_nodes": activations_to_uint8(model)} if to_uint8 else {}
    done.update(channel_pad=pad_conv_input_channels(model), quantized_pools=quantize_global_pool(model),
                pools_as_conv=average_pool_as_depthwise_conv(model), hard_sigmoids_as_add=hard_sigmoid_as_add(model))
    if any(done.values()):
        onnx.save(model, str(path))
    return {**done, "scheme": qdq_scheme(model)}


def _ort_graph(path: Path) -> dict[str, Any]:
    """What ORT's optimizer leaves of the int8 graph at ``path``."""
    from ._qdq import ort_fusion

    try:
        return ort_fusion(path)
    except Exception as e:  # an ORT session failure is the build's problem, named with its cause
        raise BuildError(f"{path}: ONNX Runtime cannot load the int8 graph ({e})") from e


class OnnxTarget(Target):
    name = "onnx"
    precisions = (Precision.FP32, Precision.INT8)
    runtime = "onnxruntime"
    install_hint = "pip install onnxruntime"
    description = "ONNX Runtime on the CPU (generic target)"

    def available(self) -> tuple[bool, str]:
        from ._ort import ort_available

        return ort_available()

    def build_available(self) -> tuple[bool, str]:
        ok, why = self.available()
        if not ok:
            return ok, why
        try:
            import onnx  # noqa: F401
        except ImportError as e:
            return False, f"onnx is not installed ({e}); pip install onnx"
        return True, why

    def build(
        self, source: ModelSource, precision: Precision, calibration: "RepresentativeSet | None", out_dir: Path
    ) -> Artifact:
        from ._onnx_clean import clean_onnx

        dst = Path(out_dir) / MODEL_FILE
        details: dict[str, Any] = {}
        if precision is Precision.FP32:
            details["cleanup"] = clean_onnx(Path(source.onnx_fp32), dst)
            details["method"] = "exported fp32"
        elif source.onnx_qdq is not None and Path(source.onnx_qdq).is_file():
            details["cleanup"] = clean_onnx(Path(source.onnx_qdq), dst)
            details.update(method="qat-qdq", weight_bits=source.qdq_weight_bits)
        else:
            if calibration is None:
                raise BuildError("onnx int8 without a QAT QDQ graph needs a calibration set")
            clean = dst.with_name("fp32.clean.onnx")
            try:
                details["cleanup"] = clean_onnx(Path(source.onnx_fp32), clean)
                details.update(static_quantize_onnx(clean, dst, calibration, input_name=source.input_spec.name))
            finally:
                clean.unlink(missing_ok=True)
            details.update(method="ort-static-ptq-qdq", weight_bits=7, per_channel=True, calibration="minmax")
        if precision is Precision.INT8:
            details.update(_int8_rewrites(dst, to_uint8=details["method"] == "qat-qdq"))
        try:
            _check_onnx(dst)
        except BuildError as e:
            failed = str(details.get("pre_process", ""))
            if failed.startswith("failed"):
                raise BuildError(f"{e} (quant_pre_process had {failed}; the graph was quantized without it)") from e
            raise
        if precision is Precision.INT8:
            details["ort_graph"] = _ort_graph(dst)
        return Artifact(target=self.name, precision=precision, files=[MODEL_FILE], runtime=self.runtime, details=details)

    def load(self, bundle_dir: Path, artifact: ArtifactInfo, input_spec: InputSpec, *,
             threads: int | None = None) -> Runner:
        from ._ort import OrtRunner

        return OrtRunner(Path(bundle_dir) / artifact.main, threads=threads)
