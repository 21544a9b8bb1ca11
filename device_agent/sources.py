"""Where the agent's inputs come from: folder, .npz, CSV, MQTT topic, Python iterator.

A source yields `Item`s: one raw sample (batch dimension absent, shape of the
bundle's input spec without the batch), an id, and optionally the true label
(used only to report accuracy in tests and demos, never for routing).
"""

from __future__ import annotations

import csv
import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from edgecore.errors import AgentError
from edgecore.spec import InputSpec

#: longest feeder id (MQTT 5 correlation data) an answer echoes; longer ones are replaced by ``mqtt-N``
MAX_INPUT_ID = 200

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".pgm"}


@dataclass(frozen=True)
class Item:
    id: str
    raw: np.ndarray
    label: int | None = None


def check_sample(raw: np.ndarray, spec: InputSpec, *, where: str) -> np.ndarray:
    a = np.asarray(raw, dtype=np.float32)
    if a.shape != spec.sample_shape:
        raise AgentError(f"{where}: sample shape {list(a.shape)} does not match the bundle's {list(spec.sample_shape)}")
    return a


def _load_image(path: Path, spec: InputSpec) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is in the agent extra
        raise AgentError("reading images needs pillow: pip install 'edge-toolchain[agent]'") from e
    shape = spec.sample_shape
    if spec.layout != "NCHW" or len(shape) != 3:
        raise AgentError(f"{path}: images need an NCHW bundle, this one takes {spec.layout} {list(shape)}")
    c, h, w = shape
    try:
        with Image.open(path) as f:
            im = f.convert("L" if c == 1 else "RGB")
            if spec.resize == "letterbox":  # aspect kept, centred, padded: as the model's training images were
                scale = min(w / im.width, h / im.height)
                nw, nh = max(1, round(im.width * scale)), max(1, round(im.height * scale))
                inner = np.asarray(im.resize((nw, nh), Image.Resampling.BILINEAR), dtype=np.float32)
                inner = inner[..., None] if inner.ndim == 2 else inner
                a = np.full((h, w, inner.shape[2]), spec.pad_value, np.float32)
                top, left = (h - nh) // 2, (w - nw) // 2
                a[top:top + nh, left:left + nw] = inner
                a = a[..., 0] if c == 1 else a
            else:
                a = np.asarray(im.resize((w, h)), dtype=np.float32)
    except OSError as e:
        raise AgentError(f"{path}: unreadable image ({e})") from e
    return a[None] if c == 1 else a.transpose(2, 0, 1)


def folder_source(path: Path, spec: InputSpec) -> Iterator[Item]:
    """Images or ``.npy`` files in name order; a ``.npy`` may hold one sample or a batch."""
    path = Path(path)
    if not path.is_dir():
        raise AgentError(f"{path}: not a folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES | {".npy"})
    if not files:
        raise AgentError(f"{path}: no images or .npy files")
    for f in files:
        if f.suffix.lower() == ".npy":
            try:
                a = np.load(f, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise AgentError(f"{f}: unreadable .npy ({e})") from e
            if a.shape == spec.sample_shape:
                yield Item(f.name, check_sample(a, spec, where=str(f)))
            else:
                for i, s in enumerate(a):
                    yield Item(f"{f.name}[{i}]", check_sample(s, spec, where=str(f)))
        else:
            yield Item(f.name, _load_image(f, spec))


def npz_source(path: Path, spec: InputSpec, *, key: str | None = None) -> Iterator[Item]:
    """Samples of array ``key`` (default: ``x``, ``X`` or the first); labels from ``y`` if present."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise AgentError(f"{path}: unreadable .npz ({e})") from e
    names = list(data.files)
    k = key or next((n for n in ("x", "X", "inputs") if n in names), names[0] if names else None)
    if k is None or k not in names:
        raise AgentError(f"{path}: no array {key!r} (has {names})")
    x = data[k]
    y = data["y"] if "y" in names and k != "y" else None
    for i in range(len(x)):
        yield Item(f"{k}[{i}]", check_sample(x[i], spec, where=f"{path}:{k}[{i}]"),
                   int(y[i]) if y is not None else None)


#: header names of a CSV's label column
CSV_LABELS = ("label", "y", "target", "class")


def csv_source(path: Path, spec: InputSpec) -> Iterator[Item]:
    """One sample per row: the bundle's input size in numbers (reshaped to its input shape).

    A first row that is not all numbers is a header; its column named ``label`` (or ``y``, ``target``,
    ``class``) holds class indices, used only to report accuracy. Empty lines are skipped.
    """
    path = Path(path)
    size = math.prod(spec.sample_shape)
    try:
        f = open(path, newline="")
    except OSError as e:
        raise AgentError(f"{path}: unreadable CSV ({e.strerror or e})") from e
    with f:
        label_col: int | None = None
        for n, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row]
            if not any(cells):
                continue
            if n == 1 and not all(_is_number(c) for c in cells):
                names = [c.lower() for c in cells]
                label_col = next((names.index(k) for k in CSV_LABELS if k in names), None)
                continue
            label = None
            if label_col is not None:
                if label_col >= len(cells) or not _is_number(cells[label_col]):
                    raise AgentError(f"{path}:{n}: no class index in the label column")
                label = int(float(cells[label_col]))
                cells = cells[:label_col] + cells[label_col + 1:]
            if len(cells) != size:
                raise AgentError(f"{path}:{n}: {len(cells)} features, the bundle takes {size} "
                                 f"({list(spec.sample_shape)})" + ("" if label_col is not None else
                                                                   "; a label column needs a header row"))
            try:
                values = np.asarray([float(c) for c in cells], dtype=np.float32)
            except ValueError as e:
                raise AgentError(f"{path}:{n}: not a number ({e})") from e
            yield Item(f"{path.name}:{n}", values.reshape(spec.sample_shape), label)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def paced(items: Iterable[Item], rate: float | None) -> Iterator[Item]:
    """``items`` at most ``rate`` per second (None or 0: as fast as they come); see `Pacer`."""
    pacer = Pacer(rate)
    for it in items:
        pacer.wait()
        yield it


class Pacer:
    """Holds a loop to ``rate`` iterations per second: `wait` before each.

    Scheduled against the clock, so sleeping late does not slow the average down; a loop that falls
    behind (a slow source) is not made up for with a burst.
    """

    def __init__(self, rate: float | None) -> None:
        if rate is not None and (not math.isfinite(rate) or rate < 0):
            raise AgentError(f"--rate {rate}: give a number of inputs per second (0: as fast as possible)")
        self.period = 1.0 / rate if rate else 0.0
        self._next = 0.0

    def wait(self) -> None:
        if not self.period:
            return
        now = time.monotonic()
        if self._next > now:
            time.sleep(self._next - now)
        self._next = max(self._next, now) + self.period


def iterator_source(it: Iterable[Any], spec: InputSpec) -> Iterator[Item]:
    """Samples, ``(sample, label)`` pairs or `Item`s from any Python iterable."""
    for i, v in enumerate(it):
        if isinstance(v, Item):
            yield Item(v.id, check_sample(v.raw, spec, where=f"item {v.id}"), v.label)
        elif isinstance(v, tuple):
            yield Item(str(i), check_sample(v[0], spec, where=f"item {i}"), None if v[1] is None else int(v[1]))
        else:
            yield Item(str(i), check_sample(v, spec, where=f"item {i}"))


#: the most inputs one MQTT message may carry; a bigger batch is refused with an error answer
MAX_INPUTS_PER_MESSAGE = 256


class MqttInputSource:
    """Inputs arriving as binary tensors on an MQTT topic (under the device's own prefix).

    The agent's client subscribes and calls `push` (on the MQTT network thread); iteration ends after `close`.
    The network thread only reads a message's header and queues it, never waits and never does per-input
    work: it also carries the cloud's replies and the keepalive, and a message of 2,500 inputs once blocked it
    until the broker dropped the agent. Checking and splitting happen where the inputs are consumed.

    Bounded: a message of more than ``max_per_message`` inputs is refused, and one that would take the queue
    past ``maxsize`` inputs is dropped (the agent is behind); both are counted (`counts`) and answered on the
    answers topic with ``{"id", "ok": false, "route": "refused", "error"}`` when ``reply`` is given. A payload
    that is not a tensor of the bundle's input shape is counted as ``rejected`` and answered the same way.
    """

    def __init__(self, topic: str, spec: InputSpec, *, maxsize: int = 1000,
                 max_per_message: int = MAX_INPUTS_PER_MESSAGE,
                 reply: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.topic = topic
        self.spec = spec
        self.maxsize = maxsize
        self.max_per_message = max_per_message
        self.reply = reply
        self._q: queue.SimpleQueue[tuple[np.ndarray, str, str | None, int | None] | None] = queue.SimpleQueue()
        self._n = 0
        self._queued = 0  # inputs waiting in ``_q``
        self._lock = threading.Lock()
        self.rejected = 0  # messages that were not a tensor of the bundle's input shape
        self.refused = 0  # messages past ``max_per_message``
        self.dropped = 0  # inputs that arrived while ``maxsize`` were waiting

    def counts(self) -> dict[str, int]:
        """What never reached the model: ``rejected`` and ``refused`` messages, ``dropped`` inputs."""
        return {"rejected": self.rejected, "refused": self.refused, "dropped": self.dropped}

    def _refuse(self, name: str, error: str) -> None:
        if self.reply is not None:
            try:
                self.reply({"id": name, "ok": False, "route": "refused", "error": error})
            except Exception:  # an answer that cannot go out must not stop the inputs
                pass

    def push(self, payload: bytes, *, input_id: str | None = None, label: int | None = None) -> None:
        """One message: a sample or a batch. ``input_id`` (a feeder's MQTT 5 correlation data) becomes the
        answer's ``id`` (``ID[i]`` for a batch's i-th sample); ``label`` (its ``label`` user property) its
        ``true_label``. Without them: ``mqtt-N`` in arrival order, no label. Never blocks."""
        from edgecore.wire import WireError, decode_tensor

        with self._lock:
            n, self._n = self._n, self._n + 1
        name = f"mqtt-{n}" if input_id is None else input_id
        try:
            a = decode_tensor(payload, max_bytes=1 << 24)  # the header is read; the body is not copied
        except WireError as e:
            self.rejected += 1
            self._refuse(name, f"not an input tensor: {e}")
            return
        shape = self.spec.sample_shape
        count = 1 if a.shape == shape else a.shape[0] if a.ndim == len(shape) + 1 and a.shape[1:] == shape else -1
        if count < 0:
            self.rejected += 1
            self._refuse(name, f"input of shape {list(a.shape)}; the bundle takes {list(shape)} or a batch of them")
            return
        if count > self.max_per_message:
            self.refused += 1
            self._refuse(name, f"a message of {count} inputs; one message may carry at most {self.max_per_message}")
            return
        with self._lock:
            full = self._queued + count > self.maxsize
            if not full:
                self._queued += count
        if full:
            self.dropped += count
            self._refuse(name, f"the agent is behind ({self.maxsize} inputs waiting): {count} input(s) dropped")
            return
        self._q.put((a, name, None if count == 1 and a.shape == shape else "batch", label))

    def push_message(self, msg: Any) -> None:
        """`push` a paho message, reading the feeder's id and label from its MQTT 5 properties if it has them."""
        props = getattr(msg, "properties", None)
        input_id = label = None
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        if isinstance(corr, (bytes, bytearray)) and 0 < len(corr) <= MAX_INPUT_ID:
            input_id = bytes(corr).decode("utf-8", "replace")
        for k, v in (getattr(props, "UserProperty", None) or []) if props is not None else []:
            if k == "label" and v.lstrip("-").isdigit() and len(v) < 12:
                label = int(v)
        self.push(msg.payload, input_id=input_id, label=label)

    def close(self) -> None:
        self._q.put(None)

    def __iter__(self) -> Iterator[Item]:
        while (got := self._q.get()) is not None:
            a, name, batch, label = got
            samples = [a] if batch is None else list(a)
            with self._lock:
                self._queued -= len(samples)
            for i, s in enumerate(samples):
                yield Item(name if batch is None else f"{name}[{i}]", np.asarray(s, dtype=np.float32), label)
