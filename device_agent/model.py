"""The local model with rollback: load, smoke-test, swap atomically, roll back on a live failure.

Why staged: an update must never leave the device half-switched. `load_model`
does everything that can fail (load with this device's runtime, answer a smoke
input, read the drift reference, parse the routing block) and returns an
immutable `LoadedModel`; `LocalModel.swap` then only exchanges two references
under a lock, which cannot fail. ``ok: false`` therefore always means the old
model is still serving.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np

from edgecore.bundle import Bundle
from edgecore.confidence import confidence, confidence_one
from edgecore.errors import AgentError, BundleTrustError, EdgeError
from targets import load_runner

from .updates import smoke_test

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A bundle loaded, smoke-tested and with everything the agent reads from it already parsed."""

    bundle: Bundle
    runner: Any
    measure: str
    temperature: float
    threshold: float | None  # the bundle's own routing threshold
    drift_reference: dict[str, Any] | None
    labels: tuple[str, ...]  # the bundle's labels, read once (not a list copy per answer)

    def label(self, pred: int) -> str:
        """The label of class ``pred`` (its number when the bundle names fewer classes)."""
        labels = self.labels
        return labels[pred] if 0 <= pred < len(labels) else str(pred)


class Inference(NamedTuple):  # a tuple, not a frozen dataclass: made once per input, a fraction of the cost
    model: LoadedModel  # the model that answered (the previous one after a rollback)
    x: np.ndarray  # its preprocessed input
    logits: np.ndarray
    confidence: np.ndarray
    seconds: float  # preprocessing + runtime


def _routing(bundle: Bundle) -> tuple[str, float, float | None]:
    r = bundle.routing  # typed and validated by the manifest reader
    return (r.measure, r.temperature, r.threshold) if r is not None else ("max_prob", 1.0, None)


#: models up to this size run on one runtime thread unless told otherwise: their ops are too small for
#: a thread pool's hand-offs to pay, and the agent and the OS need the other cores (docs/bench.md)
TINY_MODEL_BYTES = 1 << 20


def model_bytes(bundle: Bundle) -> int:
    """Bytes of the artifact itself (its main file, files beside it of the same stem, or its folder)."""
    main = bundle.manifest.artifact.main.rstrip("/")
    stem = main.rsplit(".", 1)[0]
    return sum(e.size for name, e in bundle.manifest.files.items()
               if name == main or name.startswith(main + "/") or name.rsplit(".", 1)[0] == stem)


def device_threads(bundle: Bundle, threads: int | None) -> int | None:
    """Runtime threads on the device: ``threads`` if given (0: the runtime's own), else 1 for tiny models."""
    if threads is not None:
        return int(threads) or None
    return 1 if model_bytes(bundle) <= TINY_MODEL_BYTES else None


def load_model(bundle: Bundle, *, threads: int | None = None) -> LoadedModel:
    """Load with this device's runtime, answer a smoke input and read what the agent needs, or raise.

    ``threads``: None picks the device default (`device_threads`), 0 the runtime's own.
    """
    try:
        runner = load_runner(bundle, threads=device_threads(bundle, threads))
    except EdgeError:
        raise
    except Exception as e:  # runtimes raise their own types for corrupt artifacts
        raise BundleTrustError(f"bundle {bundle.root} failed to load: {type(e).__name__}: {e}") from e
    smoke_test(bundle, runner)
    measure, temperature, threshold = _routing(bundle)
    # read now, not after the switch: an unreadable reference is a `BundleTrustError` here
    return LoadedModel(bundle, runner, measure, temperature, threshold, bundle.drift_reference(), tuple(bundle.labels))


class LocalModel:
    """The serving model and the previous one; ``infer`` rolls back when the serving one fails live."""

    def __init__(self, model: LoadedModel, *, on_rollback: Callable[[LoadedModel, Exception], None] | None = None):
        self._current = model
        self._previous: LoadedModel | None = None
        self._lock = threading.Lock()
        self._on_rollback = on_rollback

    @property
    def current(self) -> LoadedModel:
        return self._current

    @property
    def previous(self) -> LoadedModel | None:
        return self._previous

    def check_compatible(self, new: LoadedModel) -> None:
        if new.bundle.input_spec.sample_shape != self._current.bundle.input_spec.sample_shape:
            raise AgentError("the new bundle takes a different input shape than this device's source")

    def swap(self, new: LoadedModel) -> None:
        """Serve ``new``, keep the old one for rollback. Only exchanges references: cannot fail halfway."""
        with self._lock:
            self._previous, self._current = self._current, new

    def rollback(self, err: Exception) -> LoadedModel:
        with self._lock:
            if self._previous is None:
                raise AgentError(f"the bundle failed on a live input and there is none to roll back to: {err}") from err
            bad, self._current, self._previous = self._current, self._previous, None
        log.error("bundle %s failed on a live input (%s); rolled back", bad.bundle.root, err)
        if self._on_rollback is not None:
            self._on_rollback(self._current, err)
        return self._current

    def _run(self, raw: np.ndarray) -> tuple[LoadedModel, np.ndarray, np.ndarray, float]:
        """Preprocess and run a batch of raw samples: (model that answered, input, logits, seconds).

        Rolls back to the previous model when the serving one fails live.
        """
        m = self._current
        t0 = time.perf_counter()  # on-device latency counts preprocessing too
        try:
            x = m.bundle.input_spec.preprocess(raw)
            logits = np.asarray(m.runner.run(x))
        except Exception as e:
            if isinstance(e, EdgeError) and self._previous is None:
                raise
            m = self.rollback(e)
            t0 = time.perf_counter()
            x = m.bundle.input_spec.preprocess(raw)  # the previous bundle may normalise differently
            logits = np.asarray(m.runner.run(x))
        return m, x, logits, time.perf_counter() - t0

    def infer(self, raw: np.ndarray) -> Inference:
        """Preprocess, run and score a batch of raw samples; rolls back on a live failure."""
        m, x, logits, dt = self._run(raw)
        conf = confidence(logits, measure=m.measure, temperature=m.temperature)
        return Inference(m, x, logits, np.asarray(conf, dtype=np.float64), dt)

    def infer_one(self, raw: np.ndarray) -> tuple[LoadedModel, np.ndarray, np.ndarray, float, float]:
        """`infer` for a batch of one, the device's usual case: (model, input, logits, confidence, seconds).

        The confidence is a plain float (no one-element array made and read back).
        """
        m, x, logits, dt = self._run(raw)
        return m, x, logits, confidence_one(logits, measure=m.measure, temperature=m.temperature), dt
