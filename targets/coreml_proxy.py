"""The coreml proxy: the PyTorch student with the artifact's compression reproduced, where Core ML is absent.

Core ML predicts only on macOS. Elsewhere the build reproduces, on the
PyTorch student, what coremltools did to the weights and evaluates that:

- the converter folds BatchNorm into the preceding convolution
  (``torch.fx.experimental.optimization.fuse`` does the same fold);
- an fp16 ML program stores its weights and computes in float16
  (the proxy runs the folded model in float16);
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
    except Exception:  # noqa: BLE001 - not symbolically traceable: BatchNorm stays separate (quantized the same per channel)
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


def artifact_weights(package: Path) -> list[np.ndarray]:
    """The dequantized weights an ML program stores compressed (``constexpr_*`` ops), in program order.

    Reads the package with coremltools' MIL loader, which works off macOS.
    """
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil

    m = ct.models.MLModel(str(package), skip_model_load=True)
    spec = m.get_spec()
    prog = load_mil(spec, spec.specificationVersion, m.weights_dir)
    out = []
    for f in prog.functions.values():
        for op in f.operations:
            if op.op_type == "constexpr_affine_dequantize":
                q, zp, scale = (op.inputs[k].val for k in ("quantized_data", "zero_point", "scale"))
                axis = int(op.inputs["axis"].val)
                shape = [1] * q.ndim
                shape[axis] = -1
                w = (q.astype(np.float32) - np.reshape(zp, shape).astype(np.float32)) * np.reshape(scale, shape)
                out.append(w.astype(scale.dtype))
    return out


def match_artifact_weights(model: Any, package: Path) -> dict[str, Any]:
    """Check that every compressed weight of the artifact is a weight of the proxy model, value for value.

    Weights pair up by shape and value (program order and module order may
    differ); raises `BuildError` naming the tensors that have no equal.
    """
    from edgecore.errors import BuildError

    mine = [p.detach().float().numpy() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() >= 2]
    theirs = artifact_weights(package)
    unmatched, worst = [], 0.0
    pool = list(range(len(mine)))
    for k, w in enumerate(theirs):
        diffs = [(float(np.abs(mine[i] - w).max()), i) for i in pool if mine[i].shape == w.shape]
        if not diffs:
            unmatched.append(f"#{k} {tuple(w.shape)}: no proxy weight of that shape")
            continue
        d, i = min(diffs)
        tol = float(np.abs(w).max()) * 2.0**-10  # one fp16 ulp of the tensor's largest value
        if d > tol:
            unmatched.append(f"#{k} {tuple(w.shape)}: differs by {d:.3g} (> {tol:.3g})")
            continue
        worst = max(worst, d)
        pool.remove(i)
    if unmatched or len(theirs) != len(mine):
        raise BuildError(f"{package}: the coreml proxy does not reproduce the artifact's weights ({len(theirs)} compressed "
                         f"in the artifact, {len(mine)} in the proxy): " + "; ".join(unmatched[:10]))
    return {"weights_matched": len(theirs), "max_abs_diff": worst}


class TorchProxyRunner:
    def __init__(self, model: Any, dtype: Any) -> None:
        self.model, self.dtype = model, dtype

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.dtype)
            return self.model(x).float().numpy()


def coreml_proxy(model: Any, precision: Precision, compression: WeightCompression, *, package: Path | None = None) -> Proxy:
    """The proxy of an artifact; for int8 with ``package`` given, its weights are checked against the artifact's."""
    import torch

    m, done = compress_like_coreml(model, precision, compression)
    c = compression
    match = ""
    if precision is Precision.INT8 and package is not None:
        got = match_artifact_weights(m, package)
        match = f"; all {got['weights_matched']} equal to the artifact's stored weights"
    evaluates = {
        Precision.FP32: "the PyTorch student, BatchNorm folded, fp32 (an fp32 ML program)",
        Precision.FP16: "the PyTorch student, BatchNorm folded, fp16 weights and compute (an fp16 ML program)",
        Precision.INT8: f"the PyTorch student, BatchNorm folded, fp16 compute, {done['quantized_weights']} weight tensors "
                        f"quantized as coremltools does ({c.mode}, {c.dtype}, {c.granularity}){match}",
    }[precision]
    runner: Runner = TorchProxyRunner(m, getattr(torch, done["dtype"]))
    return Proxy(runner=runner, runtime=f"pytorch {torch.__version__.split('+')[0]} CPU {done['dtype']}",
                 evaluates=evaluates, not_modelled="Core ML's own op fusions and the Neural Engine/GPU kernels")
