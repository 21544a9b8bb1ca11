"""Classification: one class vector (logits) per input."""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np

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
