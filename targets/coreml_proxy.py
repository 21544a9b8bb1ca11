"""The coreml proxy: the built package's own ML program, run where Core ML is absent.

Core ML predicts only on macOS. Elsewhere the build reads the package back
with coremltools' MIL loader and executes its program op by op in PyTorch
(`targets.coreml_mil`): the graph coremltools produced (BatchNorm folded into
a convolution or kept beside a Linear, as it chose), every weight as stored
(int8 ones dequantized by their ``constexpr_affine_dequantize`` ops), in the
program's compute dtype (fp16 programs in float16). A package whose weights
differ answers differently and fails the accuracy gate.

A program with an op the interpreter does not know cannot be looked into:
the proxy then falls back to the PyTorch student with the artifact's weight
treatment reproduced (`compress_like_coreml`) and says ``unverified``
(`Proxy.unverified`), never ``proxy``.

The reproduction (for that fallback) mirrors what coremltools does:
- the converter folds BatchNorm into the preceding convolution
  (``torch.fx.experimental.optimization.fuse`` does the same fold);
- an fp16 ML program stores its weights and computes in float16;
- ``linear_quantize_weights`` (int8) quantizes every weight tensor of rank
  >= 2 with at least 10 and more than ``weight_threshold`` elements, scales
  per output channel (conv and linear: axis 0; transposed conv: axis 1),
  ``linear_symmetric`` over [-127, 127] (``linear``: [-128, 127] with a zero
  point), computed on the fp16 weights (`quantize_like_coremltools`, checked
  against coremltools' own routine in the tests).

What only Core ML can tell: its own op fusions and the Neural Engine's or
GPU's kernels (fp16 accumulation on the Neural Engine).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecore.spec import Precision

from .base import Proxy, Runner

MIN_WEIGHT_ELEMENTS = 10  # coremltools keeps smaller consts inline and never compresses them


@dataclass(frozen=True)
class WeightCompression:
    """The coremltools weight quantization of an int8 artifact; the build applies it, the proxy reproduces it."""

    mode: str = "linear_symmetric"  # | "linear"
    dtype: str = "int8"  # | "uint8" (| "int4", "uint4": iOS18 targets)
    granularity: str = "per_channel"  # | "per_tensor"
    weight_threshold: int = 0

    def coreml_config(self) -> Any:
        from coremltools.optimize.coreml import (
            OpLinearQuantizerConfig,
            OptimizationConfig,
        )

        return OptimizationConfig(global_config=OpLinearQuantizerConfig(
            mode=self.mode, dtype=self.dtype, granularity=self.granularity, weight_threshold=self.weight_threshold))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> WeightCompression:
        return cls(**(d or {}))


def _quant_range(dtype: str, mode: str) -> tuple[int, int]:
    bits, signed = int(dtype.lstrip("uint")), not dtype.startswith("u")
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if mode == "linear_symmetric":
        lo, hi = (lo + 1, hi) if signed else (lo, hi - 1)
    return lo, hi


def quantize_like_coremltools(w: np.ndarray, c: WeightCompression, *, channel_axis: int) -> np.ndarray:
    """``w`` quantized and dequantized as coremltools' linear quantizer does it (same dtype as ``w``)."""
    axes = tuple(a for a in range(w.ndim) if not (c.granularity == "per_channel" and a == channel_axis))
    lo_q, hi_q = _quant_range(c.dtype, c.mode)
    vmin, vmax = np.amin(w, axis=axes, keepdims=True), np.amax(w, axis=axes, keepdims=True)
    if c.mode == "linear_symmetric":
        vmax = np.maximum(np.abs(vmin), np.abs(vmax))
        vmin = -vmax
    else:
        vmin, vmax = np.minimum(0.0, vmin), np.maximum(0.0, vmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = (vmax - vmin) / (hi_q - lo_q)
        q = np.round(w / scale)
        zp = None
        if c.mode == "linear_symmetric" and lo_q == 0:
            zp = np.full(vmin.shape, hi_q // 2)
        elif c.mode == "linear":
            zp = np.clip(np.round((lo_q * vmax - hi_q * vmin) / (vmax - vmin)), lo_q, hi_q)
    if zp is not None:
        q = q + zp
    q = np.clip(np.nan_to_num(q), lo_q, hi_q)
    out = ((q - zp) if zp is not None else q).astype(np.float32) * scale.astype(w.dtype)
    return np.where(scale == 0, 0, out).astype(w.dtype)


def compress_like_coreml(model: Any, precision: Precision, compression: WeightCompression) -> tuple[Any, dict[str, Any]]:
    """A copy of the student with the artifact's weight treatment, and what was done to it."""
    import copy

    import torch
    from torch.fx.experimental.optimization import fuse

    m = copy.deepcopy(model).eval()
    try:
        m, folded = fuse(m), True
    except Exception:
        folded = False
    dtype = torch.float32 if precision is Precision.FP32 else torch.float16
    m = m.to(dtype)
    quantized = 0
    if precision is Precision.INT8:
        kinds = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear, torch.nn.ConvTranspose2d)
        for mod in m.modules():
            w = getattr(mod, "weight", None)
            if not isinstance(mod, kinds) or w is None or w.dim() < 2:
                continue
            if w.numel() < MIN_WEIGHT_ELEMENTS or w.numel() <= compression.weight_threshold:
                continue
            axis = 1 if isinstance(mod, torch.nn.ConvTranspose2d) else 0
            with torch.no_grad():
                w.copy_(torch.from_numpy(quantize_like_coremltools(w.detach().numpy(), compression, channel_axis=axis)))
            quantized += 1
    return m, {"batchnorm_folded": folded, "dtype": str(dtype).removeprefix("torch."), "quantized_weights": quantized}


class TorchProxyRunner:
    def __init__(self, model: Any, dtype: Any) -> None:
        self.model, self.dtype = model, dtype

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.dtype)
            return self.model(x).float().numpy()


def coreml_proxy(package: Path, precision: Precision, *, student: Any = None,
                compression: WeightCompression | None = None) -> Proxy:
    """The proxy of the package at ``package``: its own MIL program run op by op (`coreml_mil`).

    A program the interpreter cannot run falls back to ``student`` with the artifact's weight treatment
    reproduced (`compress_like_coreml`), marked unverified: that proxy never reads the package. Without a
    student either, raises `BuildError`.
    """
    from edgecore.errors import BuildError

    from .coreml_mil import MilProgramRunner, UnsupportedProgram

    try:
        runner = MilProgramRunner(package)
        runner.run(np.zeros((2, *runner.sample_shape), dtype=np.float32))  # every op's options, once
    except UnsupportedProgram as e:
        why = f"the package's program cannot be run here ({e})"
    else:
        import coremltools as ct

        dtypes = "/".join(runner.compute_dtypes)
        stored = len(runner.weights())
        quantized = sum(op.op_type == "constexpr_affine_dequantize" for op in runner.function.operations)
        return Proxy(runner=runner, runtime=f"coremltools {ct.__version__} MIL program on PyTorch CPU {dtypes}",
                     evaluates=(f"the package's own ML program ({len(runner.ops)} ops, {stored} stored weight tensors"
                                + (f", {quantized} of them int8 dequantized as stored" if quantized else "")
                                + f"), executed op by op in {dtypes}"),
                     not_modelled="Core ML's own op fusions and the CPU/GPU/Neural Engine kernels")
    if student is None:
        raise BuildError(f"{package}: {why}, and no PyTorch student was given to stand in for it")
    import torch

    m, done = compress_like_coreml(student, precision, compression or WeightCompression())
    runner_t: Runner = TorchProxyRunner(m, getattr(torch, done["dtype"]))
    return Proxy(runner=runner_t, runtime=f"pytorch {torch.__version__.split('+')[0]} CPU {done['dtype']}",
                 evaluates=f"the PyTorch student with the build's weight treatment reproduced ({done}), not the package",
                 not_modelled="the package itself: its graph and stored weights are not read",
                 unverified=why)
