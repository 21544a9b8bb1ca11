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
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"
    layout: str = "NCHW"  # "NCHW" for images, "NF" for feature vectors
    scale: float = 1.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def preprocess(self, raw: np.ndarray) -> np.ndarray:
        """Raw samples (batch first) -> the normalised float tensor the model takes."""
        x = np.asarray(raw, dtype=np.float32) * np.float32(self.scale)
        if self.mean:
            bshape = (1, len(self.mean)) + (1,) * (x.ndim - 2)
            x = (x - np.asarray(self.mean, np.float32).reshape(bshape)) / np.asarray(
                self.std, np.float32
            ).reshape(bshape)
        return x.astype(self.dtype, copy=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "layout": self.layout,
            "preprocess": {"scale": self.scale, "mean": list(self.mean), "std": list(self.std)},
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
        )

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.shape[1:])
