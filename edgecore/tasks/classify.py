"""Classification: one class vector (logits) per input."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from edgecore import confidence as _confidence
from edgecore import wire
from edgecore.confidence import confidence

from .base import Task

__all__ = ["Classify"]


class Classify(Task):
    """Raw output: logits (N, C). Targets: class indices (N,)."""

    name: ClassVar[str] = "classify"

    def confidence(self, raw: np.ndarray, *, measure: str, temperature: float) -> np.ndarray:
        return confidence(raw, measure=measure, temperature=temperature)

    def quality(self, raw: np.ndarray, targets: Any) -> np.ndarray:
        return (np.asarray(raw).argmax(axis=1) == np.asarray(targets)).astype(np.float64)

    def answer(self, raw_one: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
        """``prediction``, ``label`` and the class ``probabilities`` (docs/wire.md), for finite logits.

        The softmax stays in the logits' dtype (float32 from a runtime); probabilities go out to 6 digits.
        """
        logits = np.asarray(raw_one).reshape(-1)
        e = np.exp(logits - logits.max())
        pred = int(logits.argmax())
        return {"prediction": pred, "label": labels[pred] if pred < len(labels) else str(pred),
                "probabilities": [round(v, 6) for v in (e / e.sum()).tolist()]}

    def output_shape(self, n_labels: int) -> tuple[int, ...]:
        """One logit per label."""
        return (n_labels,)

    def decide(self, raw: np.ndarray, *, measure: str, temperature: float,
               labels: Sequence[str]) -> tuple[Sequence[Any], np.ndarray]:
        """The top class of each input (an integer array) and its confidence."""
        logits = np.asarray(raw)
        conf = np.asarray(confidence(logits, measure=measure, temperature=temperature), dtype=np.float64)
        return logits.argmax(axis=1), conf

    def row_scorer(self, measure: str, temperature: float,
                   quant: tuple[float, int, int] | None) -> Callable[[Sequence[float]], tuple[Any, float]] | None:
        return _confidence.row_scorer(measure, temperature, quant)

    def label(self, prediction: Any, labels: Sequence[str]) -> str:
        pred = int(prediction)
        return labels[pred] if 0 <= pred < len(labels) else str(pred)

    def read_reply(self, reply: Mapping[str, Any]) -> Any | None:
        """``prediction``: a class index (an int, not a bool)."""
        pred = reply.get("prediction")
        return pred if isinstance(pred, int) and not isinstance(pred, bool) else None

    def teacher_record(self, answer: Mapping[str, Any]) -> tuple[bytes, int, float]:
        """The probabilities as a float32 tensor, the top class, 1 - the top probability."""
        p = np.asarray(answer["probabilities"], dtype=np.float32)
        return wire.encode_tensor(p), int(p.argmax()), float(1.0 - p.max())

    def sample_targets(self, samples: Sequence[Any]) -> Any:
        """Each sample's label (a person's, else the teacher's top class)."""
        return np.array([int(s.label) for s in samples], np.int64)
