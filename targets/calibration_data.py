"""One small adapter per backend over the same `RepresentativeSet`.

Each backend wants calibration data in its own shape; these adapters are the
only place that knows. Backend imports stay inside the functions.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from edgecore.representative import RepresentativeSet

__all__ = ["ort_data_reader", "nncf_dataset", "litert_representative_dataset", "torch_batches"]


def ort_data_reader(rep: RepresentativeSet, *, input_name: str) -> Any:
    """An ``onnxruntime.quantization.CalibrationDataReader`` feeding one sample per call."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):  # type: ignore[misc, unused-ignore]  # untyped where onnxruntime has no stubs
        def __init__(self) -> None:
            self._it: Iterator[np.ndarray] = rep.batches(1)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {input_name: batch}

        def rewind(self) -> None:
            self._it = rep.batches(1)

    return _Reader()


def nncf_dataset(rep: RepresentativeSet) -> Any:
    """An ``nncf.Dataset`` of single-sample batches (NNCF's one calibration abstraction)."""
    import nncf

    return nncf.Dataset([rep.inputs[i : i + 1] for i in range(len(rep))])


def litert_representative_dataset(rep: RepresentativeSet) -> Callable[[], Iterator[list[np.ndarray]]]:
    """The TFLite-style ``representative_dataset`` generator: yields ``[sample_batch]``."""

    def gen() -> Iterator[list[np.ndarray]]:
        for batch in rep.batches(1):
            yield [batch]

    return gen


def torch_batches(rep: RepresentativeSet, *, batch_size: int = 32) -> Iterator[Any]:
    """Tensors for calibrating a pt2e-prepared PyTorch model (the LiteRT int8 path)."""
    import torch

    for batch in rep.batches(batch_size):
        yield torch.from_numpy(np.ascontiguousarray(batch))
