"""Feed a device the data a user has: folder, ``.npz``, CSV or a run's split, paced, answers counted.

`open_inputs` turns what the user names into `Item`s, for a local agent (``device-agent run --source ...
--rate R``) and for `feed`, which publishes each input as a binary tensor on a device's input topic
(``<prefix>/<id>/input``, where ``device-agent run --source mqtt:`` takes them) at ``rate`` inputs per
second and counts the answers that come back on ``<prefix>/<id>/answers``: how many, by which route, and
the accuracy when the inputs carry labels.

A run's split is read by the toolchain in a process of its own (``toolchain split``): the feeder, like
everything on the device side, never imports torch, and needs the toolchain only for that option.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgecore import wire
from edgecore.errors import AgentError
from edgecore.spec import InputSpec

from .sources import Item, Pacer, csv_source, folder_source, npz_source

log = logging.getLogger(__name__)

#: the splits a run records (``toolchain split``)
RUN_SPLITS = ("test", "val", "train", "calibration")


def open_inputs(source: str | None, spec: InputSpec | None, *, run: Path | None = None, split: str = "test",
                key: str | None = None, limit: int | None = None) -> Iterator[Item]:
    """The inputs ``source`` names (a folder of images or ``.npy``, a ``.npz``, a ``.csv``) or ``run``'s
    ``split``, at most ``limit`` of them. ``spec``: the bundle's input spec (images are resized to it, CSV
    rows reshaped, every sample checked against it); without it only ``.npz`` and run splits can be read,
    unchecked (the device checks what it gets)."""
    if (source is None) == (run is None):
        raise AgentError("give the inputs: --source FOLDER|FILE.npz|FILE.csv, or --run RUN --split test|val")
    if run is not None:
        items = split_source(run, split, spec)
    else:
        assert source is not None
        items = file_source(source, spec, key=key)
    for n, it in enumerate(items):
        if limit is not None and n >= limit:
            return
        yield it


def file_source(source: str, spec: InputSpec | None, *, key: str | None = None) -> Iterator[Item]:
    path = Path(source)
    kind = "csv" if path.suffix.lower() == ".csv" else "npz" if path.suffix.lower() == ".npz" else \
        "folder" if path.is_dir() else None
    if kind is None:
        raise AgentError(f"--source {source!r}: give a folder (images or .npy), a .npz or a .csv"
                         + ("" if path.exists() else " (no such file or folder)"))
    if kind != "folder" and not path.is_file():
        raise AgentError(f"--source {source}: no such file")
    if spec is None and kind != "npz":
        raise AgentError(f"--source {source}: reading a {kind} needs the bundle's input spec: give --bundle")
    if kind == "csv":
        assert spec is not None
        return csv_source(path, spec)
    if kind == "folder":
        assert spec is not None
        return folder_source(path, spec)
    return npz_source(path, spec, key=key) if spec is not None else _unchecked_npz(path, key)


def _unchecked_npz(path: Path, key: str | None) -> Iterator[Item]:
    try:
        with np.load(path, allow_pickle=False) as data:
            names = list(data.files)
            k = key or next((n for n in ("x", "X", "inputs") if n in names), names[0] if names else None)
            if k is None or k not in names:
                raise AgentError(f"{path}: no array {key!r} (has {names})")
            x = np.asarray(data[k], np.float32)
            y = data["y"] if "y" in names and k != "y" else None
    except (OSError, ValueError) as e:
        raise AgentError(f"{path}: unreadable .npz ({e})") from e
    for i in range(len(x)):
        yield Item(f"{k}[{i}]", x[i], int(y[i]) if y is not None else None)


def split_source(run: Path, split: str, spec: InputSpec | None) -> Iterator[Item]:
    """``run``'s ``split``, written by ``toolchain split`` in its own process, then read as a ``.npz``."""
    if split not in RUN_SPLITS:
        raise AgentError(f"--split {split!r}: choose one of {', '.join(RUN_SPLITS)}")
    if importlib.util.find_spec("toolchain") is None:
        raise AgentError(f"--run {run}: reading a run's split needs the toolchain (pip install "
                         "'edge-toolchain[toolchain]'); or, where it is installed, write the split with "
                         f"`toolchain split --run {run} --split {split} --out {split}.npz` and feed that file")
    if not (Path(run) / "data.json").is_file():
        raise AgentError(f"--run {run}: not a run directory (no data.json)")
    with tempfile.TemporaryDirectory(prefix="feed-split-") as tmp:
        out = Path(tmp) / f"{split}.npz"
        r = subprocess.run([sys.executable, "-m", "toolchain.cli", "split", "--run", str(run), "--split", split,
                            "--out", str(out)], capture_output=True, text=True)
        if r.returncode != 0:
            lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
            why = lines[-1].removeprefix("error: ") if lines else f"exit code {r.returncode}"
            raise AgentError(f"reading the {split} split of {run}: {why}")
        items = list(npz_source(out, spec) if spec is not None else _unchecked_npz(out, None))
    yield from (Item(f"{split}[{i}]", it.raw, it.label) for i, it in enumerate(items))


@dataclass
class FeedReport:
    """What a feed did: inputs sent, answers back (per route), accuracy over the labelled ones."""

    device_id: str
    sent: int = 0
    answered: int = 0
    labelled: int = 0  # answers to inputs whose label was known
    correct: int = 0
    seconds: float = 0.0
    routes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device_id, "sent": self.sent, "answered": self.answered,
            "unanswered": self.sent - self.answered, "routes": dict(sorted(self.routes.items())),
            "labelled": self.labelled, "accuracy": self.correct / self.labelled if self.labelled else None,
            "seconds": round(self.seconds, 3), "rate": round(self.sent / self.seconds, 2) if self.seconds else None,
        }


class Feeder:
    """Publishes inputs to one device over the shared MQTT link and collects its answers.

    Each input carries, as MQTT 5 correlation data, an id the agent echoes in its answer (and its label as a
    ``label`` user property), so answers are matched to inputs whatever else feeds the device. On MQTT 3.1.1
    there are no properties: answers are counted, not matched, and there is no accuracy.
    """

    def __init__(self, link: Any, topics: wire.Topics) -> None:
        self.link = link
        self.topics = topics
        self.tag = uuid.uuid4().hex[:8]
        self._lock = threading.Lock()
        self._labels: dict[str, int | None] = {}
        self._answers: dict[str, dict[str, Any]] = {}
        self._unmatched = 0
        self._state: str | None = None
        self._changed = threading.Condition(self._lock)
        link.subscribe(topics.status, self._on_status)
        link.subscribe(topics.answers, self._on_answer)

    # --- network thread ---------------------------------------------------------------
    def _on_status(self, msg: Any) -> None:
        try:
            state = json.loads(msg.payload).get("state")
        except (ValueError, AttributeError):
            return
        with self._changed:
            self._state = str(state)
            self._changed.notify_all()

    def _on_answer(self, msg: Any) -> None:
        try:
            a = json.loads(msg.payload)
            aid = str(a["id"])
        except (ValueError, KeyError, TypeError):
            return
        with self._changed:
            if aid in self._labels:
                self._answers[aid] = a
            elif not self.link.v5:  # 3.1.1: the agent numbers inputs itself; count what comes back
                self._unmatched += 1
            self._changed.notify_all()

    # --- the feed ----------------------------------------------------------------------
    def wait_online(self, timeout: float) -> None:
        """Until the device's retained status says ``online``; `AgentError` naming what it says after ``timeout``."""
        end = time.monotonic() + timeout
        with self._changed:
            while self._state != "online":
                left = end - time.monotonic()
                if left <= 0:
                    said = f"its status says {self._state!r}" if self._state else "it has published no status"
                    raise AgentError(
                        f"device {self.topics.device_id} is not online on {self.link.where} ({said}); start it with "
                        f"`device-agent run --device-id {self.topics.device_id} --source mqtt: ...` "
                        f"(same --prefix {self.topics.prefix}), or give --online-timeout 0 to send anyway")
                self._changed.wait(left)

    def feed(self, items: Iterator[Item], *, rate: float | None = None, answer_timeout: float = 10.0) -> FeedReport:
        """Publish every input (QoS 1) at ``rate`` per second, then wait up to ``answer_timeout`` s after the
        last one for the answers (0: do not wait)."""
        report = FeedReport(self.topics.device_id)
        pacer = Pacer(rate)
        pending: list[Any] = []
        t0 = time.monotonic()
        for n, it in enumerate(items):
            aid = f"{self.tag}:{n}"
            with self._lock:
                self._labels[aid] = it.label
            pacer.wait()
            props = {"correlation": aid.encode(), "user": [("label", str(it.label))] if it.label is not None else None}
            pending.append(self.link.publish(self.topics.input, wire.encode_tensor(np.asarray(it.raw, np.float32)),
                                             qos=1, **props))
            report.sent += 1
            pending = [p for p in pending if not p.is_published()]
        for p in pending:  # every input reached the broker
            p.wait_for_publish(timeout=max(answer_timeout, 10.0))
        report.seconds = time.monotonic() - t0
        if answer_timeout > 0:
            end = time.monotonic() + answer_timeout
            with self._changed:
                while len(self._answers) + self._unmatched < report.sent and time.monotonic() < end:
                    self._changed.wait(max(0.0, end - time.monotonic()))
        with self._lock:
            answers, unmatched = list(self._answers.items()), self._unmatched
        report.answered = min(report.sent, len(answers) + unmatched)
        for aid, a in answers:
            route = str(a.get("route"))
            report.routes[route] = report.routes.get(route, 0) + 1
            label = self._labels.get(aid)
            if label is not None and a.get("prediction") is not None:
                report.labelled += 1
                report.correct += int(int(a["prediction"]) == label)
        return report

