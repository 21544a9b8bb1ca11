"""``openvino``: OpenVINO IR (``model.xml`` + ``model.bin``) on the CPU plugin.

fp32: the ONNX graph converted as is. fp16: the same graph with weights
compressed to fp16 in the ``.bin`` (the CPU plugin decompresses them, so
accuracy stays fp32-like while the file halves). int8: the QAT student's QDQ
graph when there is one (OpenVINO turns Q/DQ pairs into FakeQuantize and keeps
int8 weights), otherwise NNCF post-training quantization on the representative
set.

An int8 IR is not always smaller than the fp32 one. Its ``.bin`` shrinks
about 4x, but its ``.xml`` grows: the XML is the graph as indented text,
~300-450 bytes per layer, and int8 adds layers: each quantized activation is a
FakeQuantize with four range constants (five layers), each int8 weight a
Convert and a Multiply by its per-channel scales (three layers with its
constant; a QDQ source adds its zero points and a Reshape). On the tiny
digits CNN (5k parameters) the int8 IR is 26,609 bytes (NNCF PTQ; 37,673 from
a QDQ graph) against 29,865 for fp32: the weights file saves 15 KB, the XML
costs 12 KB (22 KB). From a few tens of thousands of parameters up the
weights dominate (the digits student: 262,613 vs 397,250). Every int8 build
converts the same model to an fp32 IR (uncompressed weights:
``ov.save_model`` compresses to fp16 unless told not to), records both sizes
split into XML and weights (``details["size_vs_fp32"]``) and warns when int8
does not pay in size.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

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

XML, BIN = "model.xml", "model.bin"
log = logging.getLogger(__name__)


class OpenVinoRunner:
    """Runs an IR with one static-shape compilation per batch size seen.

    The IR keeps a dynamic batch dimension, but the CPU plugin then re-infers
    shapes on every call: for a small model that doubles the time per call.
    So each batch size gets its own compiled model (the agent and single-stream
    benchmarks only ever use 1), kept in a small cache, and inputs are handed
    over without a copy.
    """

    MAX_SHAPES = 4

    def __init__(self, xml: Path, *, threads: int | None = None) -> None:
        import openvino as ov

        self._core = ov.Core()
        self._config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        self._model = self._core.read_model(str(xml))
        self._requests: dict[tuple[int, ...], Any] = {}
        self._request(self._static_shape(1))  # compile the common case up front: the first answer is not slow

    def _static_shape(self, n: int) -> tuple[int, ...]:
        dims = self._model.input(0).get_partial_shape()
        return (n, *(d.get_length() for d in list(dims)[1:]))

    def _request(self, shape: tuple[int, ...]) -> Any:
        req = self._requests.get(shape)
        if req is None:
            if len(self._requests) >= self.MAX_SHAPES:
                self._requests.pop(next(iter(self._requests)))  # oldest first
            model = self._model.clone()
            model.reshape({model.input(0).get_any_name(): list(shape)})
            req = self._core.compile_model(model, "CPU", self._config).create_infer_request()
            self._requests[shape] = req
        return req

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        req = self._request(tuple(x.shape))
        req.infer({0: x}, share_inputs=True)
        return np.array(req.get_output_tensor(0).data, copy=True)


def _ir_bytes(folder: Path) -> tuple[int, int]:
    """(XML bytes, weights bytes) of the IR in ``folder``."""
    return (folder / XML).stat().st_size, (folder / BIN).stat().st_size


def _size_vs_fp32(source: ModelSource, out_dir: Path) -> dict[str, Any]:
    """Sizes of the int8 IR in ``out_dir`` and of the same model's fp32 IR; warns when int8 is not smaller."""
    import openvino as ov

    from ._onnx_clean import clean_onnx

    with tempfile.TemporaryDirectory(prefix="ov-fp32.") as tmp:
        # the fp32 IR as the fp32 build writes it: the same source file name (the XML records it) and uncompressed
        # weights (save_model compresses them to fp16 unless told not to)
        clean_onnx(Path(source.onnx_fp32), Path(tmp) / "source.clean.onnx")
        ov.save_model(ov.convert_model(str(Path(tmp) / "source.clean.onnx")), str(Path(tmp) / XML), compress_to_fp16=False)
        fp32_xml, fp32_bin = _ir_bytes(Path(tmp))
    int8_xml, int8_bin = _ir_bytes(out_dir)
    int8, fp32 = int8_xml + int8_bin, fp32_xml + fp32_bin
    out: dict[str, Any] = {"int8_bytes": int8, "fp32_bytes": fp32, "ratio": round(int8 / max(fp32, 1), 3),
                           "int8_xml_bytes": int8_xml, "int8_bin_bytes": int8_bin,
                           "fp32_xml_bytes": fp32_xml, "fp32_bin_bytes": fp32_bin}
    if int8 >= fp32:
        out["warning"] = (f"openvino int8 IR is not smaller than fp32 ({int8:,} vs {fp32:,} bytes): its weights file "
                          f"shrank from {fp32_bin:,} to {int8_bin:,} bytes but its XML graph grew from {fp32_xml:,} to "
                          f"{int8_xml:,} (FakeQuantize ranges and weight decompression layers); on a model this small "
                          "fp32/fp16 may serve better")
        log.warning("%s: %s", source.name, out["warning"])
    return out


#: runtime layers that only move or convert data: neither int8 nor float compute
_OV_LAYOUT = frozenset({"Const", "Input", "Output", "Reorder", "Reshape", "Transpose", "Convert", "FakeQuantize"})


def runtime_precisions(xml: Path) -> dict[str, Any]:
    """What the CPU plugin runs each compute layer of the IR in: ``{"int8_ops": {...}, "float_ops": {...}}`` by
    layer type, the float ones with their precision (``"MVN bf16"``: the CPU plugin runs float layers in bf16
    where the CPU has it). Compiles the IR once on this machine's CPU; the fleet's CPU may choose otherwise."""
    import collections

    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(xml)), "CPU")
    ints: collections.Counter[str] = collections.Counter()
    floats: collections.Counter[str] = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind, prec = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
        if kind in _OV_LAYOUT:
            continue
        if prec in ("u8", "i8"):
            ints[kind] += 1
        else:
            floats[f"{kind} {prec}"] += 1
    return {"int8_ops": dict(sorted(ints.items())), "float_ops": dict(sorted(floats.items()))}


class OpenVinoTarget(Target):
    name = "openvino"
    precisions = (Precision.FP32, Precision.FP16, Precision.INT8)
    runtime = "openvino"
    install_hint = "pip install 'edge-toolchain[openvino]'  (openvino, nncf)"
    description = "OpenVINO IR on Intel CPUs/GPUs/NPUs"

    def available(self) -> tuple[bool, str]:
        try:
            import openvino as ov
        except ImportError as e:
            return False, f"openvino is not installed ({e}); on a device: pip install 'edge-toolchain[agent-openvino]'; to build: {self.install_hint}"
        try:
            devices = ov.Core().available_devices
        except Exception as e:  # plugin discovery failures are runtime errors of many kinds
            return False, f"openvino cannot list devices: {e}"
        if "CPU" not in devices:
            return False, f"openvino has no CPU plugin here (devices: {devices})"
        return True, f"openvino {ov.__version__}, devices {', '.join(devices)}"

    def build_available(self) -> tuple[bool, str]:
        try:
            import openvino as ov
        except ImportError as e:
            return False, f"openvino is not installed ({e}); {self.install_hint}"
        return True, f"openvino {ov.__version__}"

    def build(
        self, source: ModelSource, precision: Precision, calibration: "RepresentativeSet | None", out_dir: Path
    ) -> Artifact:
        import openvino as ov

        from ._onnx_clean import clean_onnx

        details: dict[str, Any] = {}
        qdq = source.onnx_qdq if precision is Precision.INT8 and source.onnx_qdq is not None else None
        use_qdq = qdq is not None and Path(qdq).is_file()
        clean = Path(out_dir) / "source.clean.onnx"
        try:
            details["cleanup"] = clean_onnx(Path(qdq) if qdq is not None and use_qdq else Path(source.onnx_fp32), clean)
            model = ov.convert_model(str(clean))
            if use_qdq:
                details.update(method="qat-qdq", weight_bits=source.qdq_weight_bits)
            else:
                if precision is Precision.INT8:
                    model = self._nncf_ptq(model, calibration)
                    details.update(method="nncf-ptq", preset="performance")
                else:
                    details["method"] = "fp16 compressed weights" if precision is Precision.FP16 else "converted fp32"
            ov.save_model(model, str(Path(out_dir) / XML), compress_to_fp16=precision is Precision.FP16)
        except BuildError:
            raise
        except Exception as e:
            raise BuildError(f"OpenVINO conversion ({precision}) failed: {e}") from e
        finally:
            clean.unlink(missing_ok=True)
        if precision is Precision.INT8:
            details["size_vs_fp32"] = _size_vs_fp32(source, Path(out_dir))
            details["runtime_precision"] = runtime_precisions(Path(out_dir) / XML)
        return Artifact(target=self.name, precision=precision, files=[XML, BIN], runtime=self.runtime, details=details)

    @staticmethod
    def _nncf_ptq(model: Any, calibration: "RepresentativeSet | None") -> Any:
        if calibration is None:
            raise BuildError("openvino int8 without a QAT QDQ graph needs a calibration set")
        try:
            import nncf
        except ImportError as e:
            raise BuildError(f"NNCF is needed for OpenVINO int8 post-training quantization ({e}); pip install nncf") from e
        from targets.calibration_data import nncf_dataset

        return nncf.quantize(
            model,
            nncf_dataset(calibration),
            preset=nncf.QuantizationPreset.PERFORMANCE,
            subset_size=len(calibration),
        )

    def load(self, bundle_dir: Path, artifact: ArtifactInfo, input_spec: InputSpec, *,
             threads: int | None = None) -> Runner:
        return OpenVinoRunner(Path(bundle_dir) / artifact.main, threads=threads)
