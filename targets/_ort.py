"""ONNX Runtime helpers shared by the targets that run ONNX on the CPU.

Device side: imports onnxruntime only, inside the functions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecore.spec import InputSpec

from .base import OneInput


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

    def one_input(self, spec: InputSpec) -> OneInput | None:
        """One raw sample: the spec's multiply-add into a new float32 array, the session's binding, a list."""
        if spec.dtype != "float32" or self.session.get_inputs()[0].type != "tensor(float)":
            return None
        a, b = spec.affine()
        run, outputs, name = self._run, self._outputs, self.input_name
        multiply, f32, batch = np.multiply, np.float32, (1, *spec.sample_shape)
        if a.size == 1:  # one channel: numpy scalars, whose arithmetic skips broadcasting (40% less per call)
            a, b = a.reshape(()), (None if b is None else b.reshape(()))

        def scaled(raw: np.ndarray) -> list:
            x = multiply(raw, a, dtype=f32)
            x.shape = batch  # (a new array: no copy)
            return run(outputs, {name: x}, None)[0].tolist()[0]

        def normalised(raw: np.ndarray) -> list:
            x = multiply(raw, a, dtype=f32)
            x += b
            x.shape = batch
            return run(outputs, {name: x}, None)[0].tolist()[0]

        return OneInput(scaled if b is None else normalised)

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        try:
            return self._run(self._outputs, {self.input_name: x}, None)[0]
        except Exception:  # let the public API raise its own, clearer error for bad input
            return np.asarray(self.session.run(self._outputs, {self.input_name: x})[0])


def ort_available() -> tuple[bool, str]:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return False, f"onnxruntime is not installed ({e}); pip install onnxruntime"
    return True, "onnxruntime " + onnxruntime.__version__
