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
        """Raw samples (batch first) -> the normalised float tensor the model takes.

        Runs once per input on a device: the constants are made once per spec (`_constants`) and the
        arithmetic, ``(raw * scale - mean) / std`` in float32, runs in place on one new array.
        """
        scale, mean, std = self._constants(np.ndim(raw))
        x = np.multiply(raw, scale, dtype=np.float32)
        if mean is not None:
            x -= mean
            x /= std
        return x if self.dtype == "float32" else x.astype(self.dtype, copy=False)

    def _constants(self, ndim: int) -> tuple[np.float32, np.ndarray | None, np.ndarray | None]:
        cache = self.__dict__.get("_const")
        if cache is None or cache[0] != ndim:
            mean = std = None
            if len(self.mean) == 1:  # one channel: float32 scalars, the same arithmetic without broadcasting (~1 µs)
                mean, std = np.float32(self.mean[0]), np.float32(self.std[0])
            elif self.mean:
                bshape = (1, len(self.mean)) + (1,) * (ndim - 2)
                mean = np.asarray(self.mean, np.float32).reshape(bshape)
                std = np.asarray(self.std, np.float32).reshape(bshape)
            cache = (ndim, np.float32(self.scale), mean, std)
            object.__setattr__(self, "_const", cache)  # a cache on a frozen value: not part of its identity
        return cache[1], cache[2], cache[3]

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
