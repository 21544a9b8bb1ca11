"""Object detection's building blocks on the toolchain side: data sets, loaders, the generated shapes set, metrics.

The torch-free decoding of a detector's raw output (shared with the device) is `edgecore.detect`.
"""

from toolchain.detection.data import DetectionSet, Letterbox, load_source

__all__ = ["DetectionSet", "Letterbox", "load_source"]
