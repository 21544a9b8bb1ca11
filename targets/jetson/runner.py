"""Run a TensorRT engine (device side: tensorrt + cuda-python, no torch).

Needs an NVIDIA GPU; not exercised on machines without one (the tests of the
builder use a stand-in of the TensorRT API, not of CUDA).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgecore.errors import AgentError


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # type: ignore[no-redef, unused-ignore]  # with cuda-python installed
    return cudart


def _check(result: Any) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise AgentError(f"CUDA call failed: {err}")
    return rest[0] if len(rest) == 1 else rest


class TrtRunner:
    def __init__(self, engine_path: Path, *, input_name: str, trt: Any) -> None:
        self.cudart = _cudart()
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise AgentError(f"{engine_path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        self.input_name = input_name
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.output_name = next(n for n in names if n != input_name)
        self.stream = _check(self.cudart.cudaStreamCreate())
        self._bufs: dict[str, tuple[int, int]] = {}

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._bufs.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self.cudart.cudaFree(ptr))
            ptr = _check(self.cudart.cudaMalloc(nbytes))
            self._bufs[name] = (ptr, nbytes)
        return ptr

    def run(self, batch: np.ndarray) -> np.ndarray:
        cr = self.cudart
        x = np.ascontiguousarray(batch, dtype=np.float32)
        self.context.set_input_shape(self.input_name, x.shape)
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        y = np.empty(out_shape, dtype=np.float32)
        d_in, d_out = self._buffer(self.input_name, x.nbytes), self._buffer(self.output_name, y.nbytes)
        _check(cr.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, cr.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        self.context.set_tensor_address(self.input_name, d_in)
        self.context.set_tensor_address(self.output_name, d_out)
        if not self.context.execute_async_v3(self.stream):
            raise AgentError("TensorRT execution failed")
        _check(cr.cudaMemcpyAsync(y.ctypes.data, d_out, y.nbytes, cr.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        _check(cr.cudaStreamSynchronize(self.stream))
        return y
