"""ONNX Runtime helpers shared by the targets that run ONNX on the CPU.

Device side: imports onnxruntime only, inside the functions.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from edgecore.spec import InputSpec

from .base import OneInput

log = logging.getLogger(__name__)


class OrtRunner:
    """One ONNX Runtime session; ``run(batch) -> logits``."""

    def __init__(self, model_path: Path | bytes, *, threads: int | None = None, optimize: bool = True) -> None:
        """``model_path``: a file, or the serialized model; ``optimize=False`` runs the graph as written."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        # no spin-waiting: on a device the spinning threads burn the cores the agent and the OS need,
        # and with tiny models they make the tail latency worse, not better
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            model_path if isinstance(model_path, bytes) else str(model_path), sess_options=so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        # the binding under InferenceSession.run: its Python checks cost several µs per call on tiny models
        # (it only checks names we fixed here); the public method where a release lacks the binding
        binding = getattr(self.session, "_sess", None)
        self._run = binding.run if binding is not None else self.session.run
        self._outputs = [self.output_name]
        # what this runner does differently from its fast path, and why ({"one_input": "..."}); logged once each
        self.fallbacks: dict[str, str] = {}

    def one_input(self, spec: InputSpec) -> OneInput | None:
        """One raw sample: the spec's multiply-add into the input buffer bound to the session, a list.

        The input and output live in buffers bound once (`IOBinding`): no arrays are made per input, and the
        session skips its per-call name lookups and output allocation (~4 µs per call on the digits student).
        One caller at a time uses the buffers; a second thread meanwhile takes the allocating path. Where the
        buffers cannot be bound (a release whose binding internals differ, an output numpy cannot hand to ORT),
        the allocating path serves, logged once and recorded in ``fallbacks["one_input"]``.
        """
        if spec.dtype != "float32" or self.session.get_inputs()[0].type != "tensor(float)":
            return None
        a, b = spec.affine()
        batch = (1, *spec.sample_shape)
        if a.size == 1:  # one channel: numpy scalars, whose arithmetic skips broadcasting (40% less per call)
            a, b = a.reshape(()), (None if b is None else b.reshape(()))
        plain = self._one_plain(a, b, batch)
        try:
            return OneInput(self._one_bound(a, b, batch, plain))
        except Exception as e:  # (a release whose binding internals differ: the public API's path)
            why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            if "one_input" not in self.fallbacks:
                log.warning("onnxruntime: the one-input path cannot bind its buffers (%s); it allocates per call "
                            "instead (slower, same answers)", why)
            self.fallbacks["one_input"] = f"allocating path, buffers not bound: {why}"
            return OneInput(plain)

    def _one_plain(self, a: np.ndarray, b: np.ndarray | None, batch: tuple[int, ...]) -> Callable[[np.ndarray], list]:
        """The allocating one-input path: a new float32 input, the session's own output (the bound path's
        fallback, for a second caller or a release without the binding internals)."""
        run, outputs, name, multiply, f32 = self._run, self._outputs, self.input_name, np.multiply, np.float32

        def plain(raw: np.ndarray) -> list:
            x = multiply(raw, a, dtype=f32)
            if b is not None:
                x += b
            x.shape = batch  # (a new array: no copy)
            return run(outputs, {name: x}, None)[0].tolist()[0]

        return plain

    def _one_bound(self, a: np.ndarray, b: np.ndarray | None, batch: tuple[int, ...],
                   plain: Callable[[np.ndarray], list]) -> Callable[[np.ndarray], list]:
        """The one-input path on buffers bound to the session; ``plain`` serves a caller that finds them busy."""
        import onnxruntime as ort

        x = np.zeros(batch, dtype=np.float32)
        y = np.array(self._run(self._outputs, {self.input_name: x}, None)[0])  # the output's shape and dtype
        io = self.session.io_binding()
        io.bind_cpu_input(self.input_name, x)  # the session reads x's own memory
        io.bind_ortvalue_output(self.output_name, ort.OrtValue.ortvalue_from_numpy(y))  # and writes into y's
        run, binding = self.session._sess.run_with_iobinding, io._iobinding
        lock = threading.Lock()
        acquire, release, multiply, add = lock.acquire, lock.release, np.multiply, np.add

        def bound(raw: np.ndarray, _io: object = io) -> list:  # (_io: keeps the binding and its buffers alive)
            if not acquire(False):
                return plain(raw)
            try:
                multiply(raw, a, out=x)  # (the sample broadcasts to the batch of one)
                if b is not None:
                    add(x, b, out=x)
                run(binding, None)
                return y.tolist()[0]
            finally:
                release()

        bound.lock = lock  # type: ignore[attr-defined]  # (held while the buffers are in use; tests hold it)
        return bound

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        try:
            return self._run(self._outputs, {self.input_name: x}, None)[0]
        except Exception:  # let the public API raise its own, clearer error for bad input
            return np.asarray(self.session.run(self._outputs, {self.input_name: x})[0])


def ort_available() -> tuple[bool, str]:
    try:
        import onnxruntime
    except ImportError as e:
        return False, f"onnxruntime is not installed ({e}); pip install onnxruntime"
    return True, "onnxruntime " + onnxruntime.__version__
