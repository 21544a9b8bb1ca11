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
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from edgecore.bundle import Bundle
from edgecore.errors import AgentError, BundleTrustError, EdgeError
from edgecore.tasks import Task, get_task
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
    # one raw sample -> (prediction, confidence): the runner's one-input path and the routing measure, made (and
    # checked against the batch path) from the fields above, also by ``dataclasses.replace`` (`answer_path`)
    answer: Callable[[np.ndarray], tuple[Any, float]] = field(init=False, repr=False, compare=False)
    sample_shape: tuple[int, ...] = field(init=False, repr=False, compare=False)
    task: Task = field(init=False, repr=False, compare=False)  # reads the outputs (the manifest's task block)
    # prediction -> its label on the per-input path: the labels' own ``__getitem__`` for a class index (the
    # smoke test checked one output per label), else the task's `Task.label`
    label_of: Callable[[Any], str] = field(init=False, repr=False, compare=False)
    # prediction -> its output statistics (`Task.output_stats`), None for a task without any (a classifier)
    output_stats: Callable[[Any], tuple[float, ...]] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        task = get_task(self.bundle.manifest.task)
        object.__setattr__(self, "task", task)
        object.__setattr__(self, "answer", answer_path(self.bundle, self.runner, self.measure, self.temperature, task))
        object.__setattr__(self, "sample_shape", self.bundle.input_spec.sample_shape)
        fast = task.row_scorer(self.measure, self.temperature, None) is not None and task.output_shape(
            len(self.labels)) == (len(self.labels),)
        object.__setattr__(self, "label_of", self.labels.__getitem__ if fast else self.label)
        object.__setattr__(self, "output_stats", task.output_stats if task.OUTPUT_STATS else None)

    def label(self, pred: Any) -> str:
        """The text of prediction ``pred`` (a class's label, its number when the bundle names fewer classes)."""
        return self.task.label(pred, self.labels)


class Inference(NamedTuple):  # a tuple, not a frozen dataclass: made once per input, a fraction of the cost
    model: LoadedModel  # the model that answered (the previous one after a rollback)
    x: np.ndarray  # its preprocessed input
    preds: Sequence[Any]  # each input's prediction (`Task.decide`: class indices in an array, lists of detections)
    confidence: np.ndarray
    seconds: float  # preprocessing + runtime (+ scoring, for one input)


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
        raise BundleTrustError(f"bundle {bundle.name} failed to load: {type(e).__name__}: {e}") from e
    smoke_test(bundle, runner)
    measure, temperature, threshold = _routing(bundle)
    # read now, not after the switch: an unreadable reference is a `BundleTrustError` here
    return LoadedModel(bundle, runner, measure, temperature, threshold, bundle.drift_reference(), tuple(bundle.labels))


def _check_inputs(spec: Any) -> np.ndarray:
    """Two raw samples whose preprocessed values are all 0 and a ramp over [-2, 2] (the spec's inverse)."""
    a, b = spec.affine()
    target = np.stack([np.zeros(spec.sample_shape), np.linspace(-2.0, 2.0, int(np.prod(spec.sample_shape)))
                       .reshape(spec.sample_shape)])
    return ((target - (0.0 if b is None else b[0])) / a[0]).astype(np.float32)


def answer_path(bundle: Bundle, runner: Any, measure: str, temperature: float,
                task: Task | None = None) -> Callable[[np.ndarray], tuple[Any, float]]:
    """``answer(raw) -> (prediction, confidence)`` for one raw sample: the runner's `one_input` path and a scorer.

    A task that reads one input's output as a row (`Task.row_scorer`: a class vector) gets the runner's own
    one-input path, checked at load against the batch path (preprocess, ``runner.run``, `Task.decide`) on two
    inputs: a path that disagrees (by more than 0.02 in confidence, or with another class that is not a near tie)
    or fails is not used, with a warning; the batch path serves instead (and a runner that fails there fails live,
    and rolls back). Any other task (detections) reads the batch path's array with `Task.decide`.
    """
    from targets.base import OneInput, one_input

    task = task or get_task(bundle.manifest.task)
    spec = bundle.input_spec
    labels = tuple(bundle.labels)
    if task.row_scorer(measure, temperature, None) is None:
        run, preprocess = runner.run, spec.preprocess

        def decide_one(raw: np.ndarray) -> tuple[Any, float]:
            preds, conf = task.decide(np.asarray(run(preprocess(raw[None]))), measure=measure,
                                      temperature=temperature, labels=labels)
            first = preds[0]
            return (first.item() if isinstance(first, np.generic) else first), float(conf[0])

        return decide_one

    def compose(path: OneInput) -> Callable[[np.ndarray], tuple[Any, float]]:
        run, score = path.run, task.row_scorer(measure, temperature, path.quant)
        assert score is not None  # (checked above for this task)
        return lambda raw: score(run(raw))

    def agrees(answer: Callable[[np.ndarray], tuple[Any, float]]) -> str | None:
        raws = _check_inputs(spec)
        # one at a time: a batch would resize a runner that batches by resizing, after its one-input path was made
        ref_logits = np.concatenate([np.asarray(runner.run(spec.preprocess(raw[None]))) for raw in raws])
        _, ref_conf = task.decide(ref_logits, measure=measure, temperature=temperature, labels=labels)
        for i, raw in enumerate(raws):
            pred, conf = answer(raw)
            row, top = ref_logits[i], int(ref_logits[i].argmax())
            near_tie = row[top] - row[pred] <= 0.01 * (float(row.max() - row.min()) or 1.0)
            if abs(conf - float(ref_conf[i])) > 0.02 or not near_tie:
                return f"input {i}: class {pred} at {conf:.4f}, the batch path {top} at {float(ref_conf[i]):.4f}"
        return None

    try:
        own = compose(one_input(runner, spec))
        why = agrees(own)
    except Exception as e:  # a path that cannot run here
        why = f"{type(e).__name__}: {e}"
    if why is None:
        return own
    log.warning("bundle %s: the runtime's one-input path disagrees with its batch path (%s); using the batch path",
                bundle.root, why)
    return compose(one_input(runner, spec, own=False))


def _answer(m: LoadedModel, raw: np.ndarray) -> tuple[int, float]:
    return m.answer(raw)


def _preprocess_run(m: LoadedModel, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = m.bundle.input_spec.preprocess(raw)
    return x, np.asarray(m.runner.run(x))


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
        if new.sample_shape != self._current.sample_shape:
            raise AgentError("the new bundle takes a different input shape than this device's source")
        if new.task.name != self._current.task.name:
            raise AgentError(f"the new bundle does task {new.task.name!r}, this device answers {self._current.task.name!r}")

    def swap(self, new: LoadedModel) -> None:
        """Serve ``new``, keep the old one for rollback. Checks first, then only exchanges references: cannot
        fail halfway. The two take one input shape, so a rollback never meets a sample of the wrong shape."""
        self.check_compatible(new)
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

    def _serve(self, call: Callable[[LoadedModel, np.ndarray], Any], raw: np.ndarray) -> tuple[LoadedModel, Any, float]:
        """``call(model, raw)`` on the serving model, timed: (model that answered, its result, seconds).

        Rolls back to the previous model when the serving one fails live, and asks that one.
        """
        m = self._current
        t0 = perf_counter()  # on-device latency counts preprocessing too
        try:
            out = call(m, raw)
        except Exception as e:
            if isinstance(e, EdgeError) and self._previous is None:
                raise
            m = self.rollback(e)
            t0 = perf_counter()
            out = call(m, raw)
        return m, out, perf_counter() - t0

    def answer_one(self, raw: np.ndarray) -> tuple[LoadedModel, Any, float, float]:
        """One raw sample of the model's sample shape: (model that answered, prediction, confidence, seconds).

        The device's usual call: the runner's one-input path (preprocessing folded in) and the scorer, timed
        together. A sample of another shape is an `AgentError` before anything runs (it would broadcast; the
        previous model takes the same shape, `swap` makes sure). Rolls back on a live failure.
        """
        if raw.shape != self._current.sample_shape:
            raise AgentError(f"input of shape {list(raw.shape)}; the bundle takes samples of shape "
                             f"{list(self._current.sample_shape)}")
        m, (pred, conf), dt = self._serve(_answer, raw)
        return m, pred, conf, dt

    def _run(self, raw: np.ndarray) -> tuple[LoadedModel, np.ndarray, np.ndarray, float]:
        """Preprocess and run a batch of raw samples: (model that answered, input, logits, seconds)."""
        if raw.shape[1:] != self._current.sample_shape:
            raise AgentError(f"inputs of shape {list(raw.shape[1:])}; the bundle takes samples of shape "
                             f"{list(self._current.sample_shape)}")
        m, (x, logits), dt = self._serve(_preprocess_run, raw)
        return m, x, logits, dt

    def infer(self, raw: np.ndarray) -> Inference:
        """Preprocess, run and decide a batch of raw samples (`Task.decide`); rolls back on a live failure."""
        m, x, out, dt = self._run(raw)
        preds, conf = m.task.decide(out, measure=m.measure, temperature=m.temperature, labels=m.labels)
        return Inference(m, x, preds, conf, dt)
