"""What a model takes and at what precision: the input spec every side shares.

Numpy and the standard library only (the device imports it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Precision", "InputSpec"]


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"

    def __str__(self) -> str:  # "fp32", not "Precision.FP32", in messages
        return self.value


@dataclass(frozen=True)
class InputSpec:
    """What the model takes, and how raw device data becomes that.

    ``shape`` has ``None`` for the batch dimension, e.g. ``[None, 1, 8, 8]`` or
    ``[None, 30]``. The device applies ``x = (raw * scale - mean) / std`` with
    mean/std broadcast along axis 1 (channels or features), then casts to dtype.

    ``resize`` says how an image file of another size becomes ``shape``'s ``H x W`` (what the device's image
    sources do; the model was trained on images made the same way): ``"stretch"`` (resized to ``H x W``, the
    aspect changed) or ``"letterbox"`` (scaled to fit with its aspect kept, centred, the rest filled with
    ``pad_value``: a detector's boxes stay true to the scene).
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"
    layout: str = "NCHW"  # "NCHW" for images, "NF" for feature vectors
    scale: float = 1.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    resize: str = "stretch"  # "stretch" | "letterbox": how an image file becomes H x W (see the class docstring)
    pad_value: float = 114.0  # letterbox: the fill, in raw units (0..255 for 8-bit images)

    def preprocess(self, raw: np.ndarray) -> np.ndarray:
        """Raw samples (batch first) -> the normalised float tensor the model takes.

        Runs once per input on a device: ``(raw * scale - mean) / std`` as one multiply and one add in float32
        (`affine`, made once per spec), the same two operations a runner folds into its own input conversion.
        """
        a, b = self.affine(np.ndim(raw) - 1)
        x = np.multiply(raw, a, dtype=np.float32)
        if b is not None:
            x += b
        return x if self.dtype == "float32" else x.astype(self.dtype, copy=False)

    def affine(self, sample_ndim: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """``(a, b)`` with ``(raw * scale - mean) / std == raw * a + b``, shaped to broadcast against a batch.

        Both are float32 arrays of ``1 + sample_ndim`` dimensions (default: this spec's), so a single sample
        without its batch dimension comes out with one: ``a`` is ``scale / std`` and ``b`` is ``-mean / std``
        per channel (axis 1), or scalars in arrays when there is one channel; ``b`` is None without a mean.
        """
        ndim = len(self.sample_shape) if sample_ndim is None else int(sample_ndim)
        cache = self.__dict__.get("_affine")
        if cache is not None and cache[0] == ndim:
            return cache[1], cache[2]
        if not self.mean:
            a, b = np.full((1,) * (ndim + 1), self.scale, np.float32), None
        else:
            mean, std = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
            bshape = (1,) * (ndim + 1) if len(mean) == 1 else (1, len(mean)) + (1,) * (ndim - 1)
            a = (self.scale / std).astype(np.float32).reshape(bshape)
            b = (-mean / std).astype(np.float32).reshape(bshape)
        object.__setattr__(self, "_affine", (ndim, a, b))  # a cache on a frozen value: not part of its identity
        return a, b

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "layout": self.layout,
            "preprocess": {"scale": self.scale, "mean": list(self.mean), "std": list(self.std),
                           # the default, stretch, is not written: the manifests of every other model read as before
                           **({"resize": self.resize, "pad_value": self.pad_value} if self.resize != "stretch" else {})},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InputSpec":
        pre = d.get("preprocess", {})
        return cls(
            name=d["name"],
            shape=tuple(d["shape"]),
            dtype=d.get("dtype", "float32"),
            layout=d.get("layout", "NCHW"),
            scale=float(pre.get("scale", 1.0)),
            mean=tuple(float(v) for v in pre.get("mean", ())),
            std=tuple(float(v) for v in pre.get("std", ())),
            resize=str(pre.get("resize", "stretch")),
            pad_value=float(pre.get("pad_value", 114.0)),
        )

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.shape[1:] if s is not None)  # the reader refuses None past the batch
