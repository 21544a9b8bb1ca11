"""``tflite``: a LiteRT (TFLite) flatbuffer run with ``ai-edge-litert``.

Converted from the PyTorch student with ``litert-torch`` (the maintained
PyTorch → LiteRT converter). fp32 converts the model as is. int8 is full
integer: the student is exported with ``torch.export``, annotated with
LiteRT's pt2e quantizer (symmetric, per-channel weights), calibrated on the
run's representative set, converted with torchao's ``convert_pt2e`` and
lowered in STATIC QDQ mode so that every op runs in int8, inputs and outputs
included. Weights are quantized per tensor by default: LiteRT stores a float
scale and an int64 zero point per output channel for per-channel weights,
which on the digits student cost ~30 KB (95.3 KB vs 87.4 KB file) for no
accuracy gain (98.9% vs 98.6%, reference 98.6%); set ``per_channel = True`` on
a subclass for models that need it (the build's accuracy gate still applies). A model with LayerNorm (a
transformer) gets per-channel weights anyway (``details.per_channel_reason``): per tensor, a small ViT lost
1.67 points on digits, per channel 0.56. The runner quantizes inputs and dequantizes outputs with the
tensors' own parameters, so callers always pass floats and get float logits.

``cat``: LiteRT's own annotation gives every input of a ``torch.cat`` the first input's quantization, so an input
ranged differently from the first is clipped to the first one's range (a detector head's ``cat([relu(box), cls])``
lost every negative class logit). Each ``cat`` is annotated here instead (`_annotate_cats`): its inputs and output
share one observer that sees every input, so the one scale covers all of them. TFLite's int8 CONCATENATION needs
one scale for its inputs and output (the converter refuses a requantized input), so the inputs' producers take
that scale too: a narrow-ranged input is stored more coarsely, never clipped. ``artifact.details`` records how
many cats were annotated (``cat_inputs_shared``).
"""

from __future__ import annotations

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
    OneInput,
    Runner,
    Target,
    first_missing,
)

if TYPE_CHECKING:  # pragma: no cover
    from edgecore.representative import RepresentativeSet

MODEL_FILE = "model.tflite"

# the clip ufunc itself: ``np.clip``'s Python wrapper costs 1.5 µs per call, more than the clipping of one input
_clip = (getattr(np, "_core", None) or np.core).umath.clip


class TfliteRunner:
    """Interpreter wrapper: batches by resizing when the graph allows, else sample by sample.

    litert-torch exports a static batch of one (its dynamic-batch export fails
    on Flatten), and XNNPACK refuses to reshape some static graphs, so a batch
    the graph cannot take runs as a loop of single samples.
    """

    def __init__(self, path: Path, *, threads: int | None = None) -> None:
        self.path, self.threads = path, threads
        self._loop = False
        self._one_last: tuple[InputSpec, object, Any] | None = None  # the path rebuilt after a batch call
        self._open()

    def _open(self) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interp = Interpreter(model_path=str(self.path), num_threads=self.threads or None)
        self.interp.allocate_tensors()
        self._details()

    def _details(self) -> None:
        """Tensor details and quantization constants, read once per allocation (not per input)."""
        self._in = self.interp.get_input_details()[0]
        self._out = self.interp.get_output_details()[0]
        self._batch = int(self._in["shape"][0])
        self._q_in: tuple[np.float32, np.float32, int, int] | None = None
        if self._in["dtype"] != np.float32:
            scale, zero = self._in["quantization"]
            info = np.iinfo(self._in["dtype"])
            self._q_in = (np.float32(1.0 / scale), np.float32(zero), int(info.min), int(info.max))
        self._q_out: tuple[np.float32, np.float32] | None = None
        if self._out["dtype"] != np.float32:
            scale, zero = self._out["quantization"]
            self._q_out = (np.float32(scale), np.float32(zero))
        self._input_view = self.interp.tensor(self._in["index"])
        self._output_view = self.interp.tensor(self._out["index"])
        self._details_gen = object()  # a new identity per allocation: one-input paths made before are stale

    def _resize(self, n: int) -> bool:
        shape = list(self._in["shape"])
        shape[0] = n
        try:
            self.interp.resize_tensor_input(self._in["index"], shape, strict=False)
            self.interp.allocate_tensors()
        except (RuntimeError, ValueError):
            self._open()  # the failed reshape leaves the interpreter unusable
            self._loop = True
            return False
        self._details()
        return True

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        if self._q_in is None:
            self.interp.set_tensor(self._in["index"], np.ascontiguousarray(x))
        else:  # quantize straight into the interpreter's input buffer: no int8 copy, no set_tensor
            inv_scale, zero, lo, hi = self._q_in
            q = np.multiply(x, inv_scale, dtype=np.float32)
            q += zero
            _clip(q, lo, hi, out=q)
            np.rint(q, out=self._input_view(), casting="unsafe")  # rounded, then cast: exact (integral, in range)
        self.interp.invoke()
        y = self.interp.get_tensor(self._out["index"])  # a copy
        if self._q_out is None:
            return y
        scale, zero = self._q_out
        return (y.astype(np.float32) - zero) * scale

    def one_input(self, spec: InputSpec) -> OneInput | None:
        """One raw sample with the spec's ``raw * a + b`` folded into the input's quantization.

        An int8 input takes ``rint(clip(raw * a / s + (b / s + zero)))`` straight into the interpreter's buffer
        (four numpy calls, as many as quantizing an already preprocessed input); the output row is read from
        the interpreter's buffer as integers (no copy, no dequantizing: `OneInput.quant`). A batch call in
        between resizes or reopens the interpreter: the path notices (one identity check) and rebuilds.
        """
        if spec.dtype != "float32":
            return None
        quant: tuple[float, int, int] | None = None
        if self._q_out is not None:
            info = np.iinfo(self._out["dtype"])
            quant = (float(self._q_out[0]), int(info.min), int(info.max))
        return OneInput(self._one_path(spec), quant)

    def _one_path(self, spec: InputSpec) -> Any:
        """The closure for the interpreter as it is now (a batch of one), checking that it still is."""
        if self._batch != 1 and (self._loop or not self._resize(1)):
            raise RuntimeError(f"{self.path}: the interpreter cannot take a batch of one")
        a, b = spec.affine()
        b = np.zeros_like(a) if b is None else b
        if a.size == 1:  # one channel: numpy scalars, whose arithmetic skips broadcasting (40% less per call)
            a, b = a.reshape(()), b.reshape(())
        gen, in_view, out_view, invoke = self._details_gen, self._input_view, self._output_view, self.interp.invoke
        multiply, clip, rint = np.multiply, _clip, np.rint
        runner = self

        def again(raw: np.ndarray) -> list:
            last = runner._one_last
            if last is None or last[0] is not spec or last[1] is not runner._details_gen:
                path = runner._one_path(spec)  # may resize: the generation to check is the one after it
                last = runner._one_last = (spec, runner._details_gen, path)
            return last[2](raw)

        if self._q_in is None:
            def one(raw: np.ndarray) -> list:
                if runner._details_gen is not gen:
                    return again(raw)
                x = multiply(raw, a)  # (float32 raw: float32; others are cast by the assignment below)
                x += b
                in_view()[...] = x
                invoke()
                return out_view().tolist()[0]
            return one
        inv_scale, zero, lo, hi = self._q_in
        qa = (a * inv_scale).astype(np.float32)
        qb = (b * inv_scale + zero).astype(np.float32)

        def one_q(raw: np.ndarray) -> list:
            if runner._details_gen is not gen:
                return again(raw)
            q = multiply(raw, qa)
            q += qb
            clip(q, lo, hi, out=q)
            rint(q, out=in_view(), casting="unsafe")  # rounded, then cast: exact (integral, in range)
            invoke()
            return out_view().tolist()[0]

        return one_q

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.asarray(batch, dtype=np.float32)
        if len(x) != self._batch and (self._loop or not self._resize(len(x))):
            step = self._batch
            return np.concatenate([self._invoke(x[i : i + step]) for i in range(0, len(x), step)])
        return self._invoke(x)


def _has_layer_norm(model: Any) -> bool:
    """Transformers (LayerNorm before every linear) get per-channel int8 weights: per tensor, a user's small ViT
    on digits lost 1.67 points against its fp32 student (88.89% vs 90.56%), per channel 0.56 (90.00%)."""
    import torch

    return any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())


#: LiteRT builtins that only move or convert data
_TFLITE_LAYOUT = frozenset({"RESHAPE", "TRANSPOSE", "QUANTIZE", "DEQUANTIZE", "PAD", "SQUEEZE", "EXPAND_DIMS",
                            "CONCATENATION", "GATHER", "STRIDED_SLICE", "SLICE", "SHAPE", "PACK", "UNPACK"})


def op_dtypes(path: Path) -> dict[str, Any]:
    """The flatbuffer's compute ops by the dtype of their first input: ``{"int8_ops": {...}, "float_ops": {...}}``
    (read without delegates, so XNNPACK's partitions do not hide them)."""
    import collections

    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(path),
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in it.get_tensor_details()}
    ints: collections.Counter[str] = collections.Counter()
    floats: collections.Counter[str] = collections.Counter()
    for op in it._get_ops_details():
        name = op["op_name"]
        first = next((dtypes.get(int(i)) for i in op["inputs"] if int(i) >= 0), None)
        if name in _TFLITE_LAYOUT or first is None:
            continue
        (ints if first in ("int8", "uint8", "int16") else floats)[name] += 1
    return {"int8_ops": dict(sorted(ints.items())), "float_ops": dict(sorted(floats.items()))}


class TfliteTarget(Target):
    name = "tflite"
    precisions = (Precision.FP32, Precision.INT8)
    runtime = "ai-edge-litert"
    install_hint = "pip install 'edge-toolchain[tflite]'  (litert-torch to build, ai-edge-litert to run)"
    description = "LiteRT (TFLite) flatbuffer for ARM/mobile CPUs and NPUs"
    per_channel: bool = False  # int8 weight granularity (see the module docstring)

    def available(self) -> tuple[bool, str]:
        try:
            from ai_edge_litert.interpreter import Interpreter  # noqa: F401
        except ImportError as e:
            return False, f"ai-edge-litert is not installed ({e}); on a device: pip install 'edge-toolchain[agent-tflite]'; to build: {self.install_hint}"
        return True, f"ai-edge-litert {self.runtime_version()}"

    def build_available(self) -> tuple[bool, str]:
        missing = first_missing(("litert_torch", self.install_hint), ("torch", TORCH_HINT))
        return (False, missing) if missing else (True, "litert-torch present")

    def build(
        self, source: ModelSource, precision: Precision, calibration: "RepresentativeSet | None", out_dir: Path
    ) -> Artifact:
        import torch

        if source.torch_model is None:
            raise BuildError("tflite builds from the PyTorch student, but the model source has none")
        try:
            import litert_torch
        except ImportError as e:
            raise BuildError(f"litert-torch is not installed ({e}); {self.install_hint}") from e
        litert_torch.config.show_progress = False  # its per-pass lines would drown our progress bar
        model = source.torch_model().eval()
        sample = (torch.zeros((1, *source.input_spec.sample_shape), dtype=torch.float32),)
        if calibration is not None and len(calibration):
            sample = (torch.from_numpy(np.ascontiguousarray(calibration.inputs[:1])),)
        details: dict[str, Any] = {"converter": f"litert-torch {_version('litert-torch')}"}
        try:
            if precision is Precision.FP32:
                edge = litert_torch.convert(model, sample)
                details["method"] = "converted fp32"
            else:
                per_channel = self.per_channel or _has_layer_norm(model)
                edge, cats = self._convert_int8(model, sample, calibration, per_channel=per_channel)
                details.update(method="pt2e-static-ptq", io="int8", per_channel=per_channel,
                               cat_inputs_shared=cats)
                if per_channel and not self.per_channel:
                    details["per_channel_reason"] = "LayerNorm in the model (a transformer): per-tensor weights " \
                                                    "lost accuracy there"
            edge.export(str(Path(out_dir) / MODEL_FILE))
            if precision is Precision.INT8:
                details.update(op_dtypes(Path(out_dir) / MODEL_FILE))
        except BuildError:
            raise
        except Exception as e:
            raise BuildError(f"LiteRT conversion ({precision}) failed: {e}") from e
        return Artifact(target=self.name, precision=precision, files=[MODEL_FILE], runtime=self.runtime, details=details)

    @staticmethod
    def _convert_int8(model: Any, sample: tuple[Any, ...], calibration: "RepresentativeSet | None", *,
                      per_channel: bool) -> tuple[Any, int]:
        """The int8 LiteRT model and how many ``cat`` ops were annotated to share one observer over their inputs."""
        import litert_torch
        import torch
        from litert_torch.quantize import pt2e_quantizer
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import quantize_pt2e

        from targets.calibration_data import torch_batches

        if calibration is None:
            raise BuildError("tflite int8 needs a calibration (representative) set")
        quantizer = _quantizer_class(pt2e_quantizer.PT2EQuantizer)().set_global(
            pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=False)
        )
        exported = torch.export.export(model, sample).module()
        prepared = quantize_pt2e.prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for batch in torch_batches(calibration, batch_size=1):
                prepared(batch)
        converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
        # traced from the eval-mode model, but an exported module's ``training`` flag stays True (its eval() is
        # refused), and litert-torch warned on every build that the model "is converted in training mode"
        for m in converted.modules():
            m.training = False
        edge = litert_torch.convert(converted, sample, quant_config=QuantConfig(pt2e_quantizer=quantizer))
        return edge, quantizer.cats

    def load(self, bundle_dir: Path, artifact: ArtifactInfo, input_spec: InputSpec, *,
             threads: int | None = None) -> Runner:
        return TfliteRunner(Path(bundle_dir) / artifact.main, threads=threads)


def _annotate_cats(gm: Any, config: Any) -> int:
    """Annotate every ``aten.cat`` so that its inputs and output share one observer, which sees every input.

    The first input edge owns the observer (observers are created in graph order, so the group's root cannot be
    the cat's output); the other edges and the output share it, and implicit sharing puts the producers' outputs
    in the same group (the converter wants one scale on a concatenation's inputs). Returns how many cats.
    """
    import torch
    from litert_torch.quantize.pt2e_quantizer_utils import get_input_act_qspec
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    qspec = get_input_act_qspec(config)
    if qspec is None:
        return 0
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.cat.default:
            continue
        if node.meta.get("quantization_annotation") is not None:
            continue
        args = [arg for arg in node.args[0] if isinstance(arg, torch.fx.Node)]
        if not args:
            continue
        shared = SharedQuantizationSpec((args[0], node))
        inputs = {arg: (qspec if i == 0 else shared) for i, arg in enumerate(args)}
        node.meta["quantization_annotation"] = QuantizationAnnotation(
            input_qspec_map=inputs, output_qspec=shared, _annotated=True
        )
        count += 1
    return count


def _quantizer_class(base: type) -> type:
    """LiteRT's pt2e quantizer with `_annotate_cats` run before its own annotators (whose ``cat`` skips them)."""

    class CatSharedQuantizer(base):
        cats = 0

        def annotate(self, model: Any) -> Any:
            self.cats = _annotate_cats(model, self.global_config)
            return super().annotate(model)

    return CatSharedQuantizer


def _version(pkg: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "unknown"
