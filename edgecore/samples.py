"""Collected samples: the contract between the gateway's collection and `toolchain refresh`.

The gateway stores offloaded inputs with the teacher's answer (opt-in, see
docs/gateway.md); `toolchain refresh` reads them back, over HTTP
(``GET /api/samples``, pages of `SamplePage`) or straight from the store's
database (table ``samples``, columns `SAMPLE_COLUMNS`). Both sides speak this
module, so neither imports the other.

One sample is the input exactly as the device sent it to the gateway (the
device model's preprocessed tensor, see ``manifest.input``), the teacher's
answer for it (a classifier's probabilities; for another task, e.g. a
detector, its JSON answer, `edgecore.tasks.Task.teacher_record`), a person's
label where one was given, and what is known of the device at the time.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .wire import WireError, decode_tensor, encode_tensor, loads

SAMPLES_SCHEMA = 1
# Columns of the gateway's ``samples`` table that `from_row` reads (the gateway may keep more).
SAMPLE_COLUMNS = ("id", "device_id", "bundle", "received", "input", "teacher_probs", "teacher_label",
                  "confidence", "drift", "flagged", "human_label", "human_answer")
MAX_SAMPLE_BYTES = 16 << 20


class SampleError(ValueError):
    """A sample record that does not follow this contract (names the field)."""


@dataclass(frozen=True)
class Sample:
    id: int
    device: str
    received: float                 # unix seconds, at the gateway
    input: np.ndarray               # as the device sent it (preprocessed, with batch axis of 1 or none)
    teacher_probs: np.ndarray       # float32, one per class (empty where the answer is not a class vector)
    bundle: str = ""                # the bundle version (manifest sha256 or version) the device ran, "" if unknown
    confidence: float | None = None  # the device model's confidence, when the device sent it
    drift: bool | None = None       # the device's drift flag at the time, when known
    flagged: bool = False           # the device asked for this input to be collected
    human_label: int | None = None  # a person's label; overrides the teacher
    teacher_label: int = field(default=-1)
    # the teacher's answer where it is not a class vector (a detector: ``{"detections": [...]}``, docs/wire.md)
    teacher_answer: Mapping[str, Any] | None = None
    # a person's answer of that kind (a detection frame: the teacher's boxes they accepted); overrides the teacher
    human_answer: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.teacher_label < 0 and self.teacher_probs.size:
            object.__setattr__(self, "teacher_label", int(np.argmax(self.teacher_probs)))

    @property
    def label(self) -> int:
        """The label to train on: a person's if given, else the teacher's top class."""
        return self.human_label if self.human_label is not None else self.teacher_label

    @property
    def answer(self) -> Mapping[str, Any] | None:
        """The answer to train on where it is not a class: a person's if given, else the teacher's."""
        return self.human_answer if self.human_answer is not None else self.teacher_answer

    @property
    def uncertainty(self) -> float:
        """1 - the teacher's top probability: the labelling queue's order (most uncertain first)."""
        return 1.0 - float(np.max(self.teacher_probs)) if self.teacher_probs.size else 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "device": self.device, "received": self.received, "bundle": self.bundle,
            "input": base64.b64encode(encode_tensor(self.input)).decode(),
            "teacher_probs": [float(p) for p in self.teacher_probs],
            "teacher_label": self.teacher_label, "confidence": self.confidence, "drift": self.drift,
            "flagged": self.flagged, "human_label": self.human_label,
            **({"teacher_answer": dict(self.teacher_answer)} if self.teacher_answer is not None else {}),
            **({"human_answer": dict(self.human_answer)} if self.human_answer is not None else {}),
        }

    @classmethod
    def from_json(cls, d: Any) -> "Sample":
        if not isinstance(d, Mapping):
            raise SampleError(f"sample: expected an object, got {type(d).__name__}")
        try:
            raw = base64.b64decode(_get(d, "input", str), validate=True)
        except ValueError as e:
            raise SampleError(f"sample {d.get('id')!r}.input: not base64 ({e})") from e
        probs = _get(d, "teacher_probs", list)
        return cls._make(d, raw, np.asarray(probs, dtype=np.float32) if probs else np.zeros(0, np.float32))

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Sample":
        """From a ``samples`` table row: ``input`` is a wire-format tensor; ``teacher_probs`` too, or a task's JSON
        answer (an object: it starts with ``{``, a tensor with the magic ``ET``)."""
        d = dict(row)
        d["device"] = d.pop("device_id", d.get("device"))
        try:
            blob = bytes(d["teacher_probs"])
            if blob[:1] == b"{":
                answer = loads(blob)
                answer.pop("schema", None)
                d["teacher_answer"] = answer
                probs = np.zeros(0, np.float32)
            else:
                probs = decode_tensor(blob, max_bytes=MAX_SAMPLE_BYTES).astype(np.float32).ravel()
        except (KeyError, TypeError, WireError) as e:
            raise SampleError(f"sample {d.get('id')!r}.teacher_probs: {e}") from e
        return cls._make(d, bytes(d.get("input") or b""), probs)

    @classmethod
    def _make(cls, d: Mapping[str, Any], raw_input: bytes, probs: np.ndarray) -> "Sample":
        sid = d.get("id")
        try:
            x = decode_tensor(raw_input, max_bytes=MAX_SAMPLE_BYTES)
        except WireError as e:
            raise SampleError(f"sample {sid!r}.input: {e}") from e
        if probs.ndim != 1 or not np.all(np.isfinite(probs)):
            raise SampleError(f"sample {sid!r}.teacher_probs: expected finite numbers, one per class")
        human = d.get("human_label")
        if human is not None and (not isinstance(human, int) or isinstance(human, bool)
                                  or not 0 <= human < max(len(probs), 1)):
            raise SampleError(f"sample {sid!r}.human_label: expected a class index below {len(probs)}, got {human!r}")
        conf = d.get("confidence")
        if conf is not None and (not isinstance(conf, (int, float)) or not math.isfinite(conf)):
            raise SampleError(f"sample {sid!r}.confidence: expected a number, got {conf!r}")
        tl = d.get("teacher_label")
        answers = {}
        for key in ("teacher_answer", "human_answer"):
            a = d.get(key)
            if a is not None and not isinstance(a, Mapping):
                raise SampleError(f"sample {sid!r}.{key}: expected an object, got {type(a).__name__}")
            answers[key] = a
        return cls(
            id=_int(sid, "id"), device=str(_req(d, "device")), received=float(_req(d, "received")),
            input=x, teacher_probs=probs, bundle=str(d.get("bundle") or ""),
            confidence=None if conf is None else float(conf),
            drift=None if d.get("drift") is None else bool(d.get("drift")),
            flagged=bool(d.get("flagged", False)), human_label=human,
            teacher_label=-1 if tl is None else _int(tl, "teacher_label"), **answers,
        )


@dataclass(frozen=True)
class SamplePage:
    """One page of ``GET /api/samples?after=ID&limit=N[&device=D]``; ``next_after`` is None on the last page."""
    samples: list[Sample]
    next_after: int | None

    def to_json(self) -> dict[str, Any]:
        return {"schema": SAMPLES_SCHEMA, "samples": [s.to_json() for s in self.samples], "next_after": self.next_after}

    @classmethod
    def from_json(cls, d: Any) -> "SamplePage":
        if not isinstance(d, Mapping) or d.get("schema") != SAMPLES_SCHEMA:
            raise SampleError(f"samples page: expected an object with schema {SAMPLES_SCHEMA}")
        items = d.get("samples")
        if not isinstance(items, list):
            raise SampleError("samples page: 'samples' must be a list")
        nxt = d.get("next_after")
        return cls([Sample.from_json(s) for s in items], None if nxt is None else _int(nxt, "next_after"))


def _req(d: Mapping[str, Any], key: str) -> Any:
    if d.get(key) is None:
        raise SampleError(f"sample {d.get('id')!r}.{key}: missing")
    return d[key]


def _get(d: Mapping[str, Any], key: str, typ: type) -> Any:
    v = _req(d, key)
    if not isinstance(v, typ):
        raise SampleError(f"sample {d.get('id')!r}.{key}: expected {typ.__name__}, got {type(v).__name__}")
    return v


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise SampleError(f"sample {what}: expected an integer, got {v!r}")
    return v
