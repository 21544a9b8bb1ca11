"""Where the agent's inputs come from: folder, .npz, MQTT topic, Python iterator.

A source yields `Item`s: one raw sample (batch dimension absent, shape of the
bundle's input spec without the batch), an id, and optionally the true label
(used only to report accuracy in tests and demos, never for routing).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from edgecore.errors import AgentError
from edgecore.spec import InputSpec

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
        with Image.open(path) as im:
            a = np.asarray(im.convert("L" if c == 1 else "RGB").resize((w, h)), dtype=np.float32)
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


def iterator_source(it: Iterable[Any], spec: InputSpec) -> Iterator[Item]:
    """Samples, ``(sample, label)`` pairs or `Item`s from any Python iterable."""
    for i, v in enumerate(it):
        if isinstance(v, Item):
            yield Item(v.id, check_sample(v.raw, spec, where=f"item {v.id}"), v.label)
        elif isinstance(v, tuple):
            yield Item(str(i), check_sample(v[0], spec, where=f"item {i}"), None if v[1] is None else int(v[1]))
        else:
            yield Item(str(i), check_sample(v, spec, where=f"item {i}"))


class MqttInputSource:
    """Inputs arriving as binary tensors on an MQTT topic (under the device's own prefix).

    The agent's client subscribes and calls `push`; iteration ends after `close`.
    A bad payload is logged and skipped, not fatal.
    """

    def __init__(self, topic: str, spec: InputSpec, *, maxsize: int = 1000) -> None:
        self.topic = topic
        self.spec = spec
        self._q: queue.Queue[Item | None] = queue.Queue(maxsize=maxsize)
        self._n = 0
        self._lock = threading.Lock()
        self.rejected = 0

    def on_message(self, msg: Any) -> None:
        """The MQTT link's callback for this source's topic."""
        self.push(msg.payload)

    def push(self, payload: bytes) -> None:
        from edgecore.wire import WireError, decode_tensor

        try:
            a = decode_tensor(payload, max_bytes=1 << 24)
            samples = [a] if a.shape == self.spec.sample_shape else list(a)
            items = [check_sample(s, self.spec, where=self.topic) for s in samples]
        except (WireError, AgentError):
            self.rejected += 1
            return
        for s in items:
            with self._lock:
                n, self._n = self._n, self._n + 1
            self._q.put(Item(f"mqtt-{n}", s))

    def close(self) -> None:
        self._q.put(None)

    def __iter__(self) -> Iterator[Item]:
        while (item := self._q.get()) is not None:
            yield item
