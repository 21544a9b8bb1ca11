"""The device agent: local inference, confidence routing to the cloud, telemetry.

Every input gets an answer tagged with where it came from:
``edge`` (confident enough), ``cloud`` (the gateway answered in time) or
``fallback`` (the cloud was asked but timed out, the broker was gone or the
gateway replied with an error: the device's own prediction, counted).

`Agent` answers inputs and composes small parts: the local model with
rollback (`model.LocalModel`), the cloud client (`cloud.CloudClient`), the
telemetry recorder (`telemetry.TelemetryRecorder`) and the command registry
(`commands`). Its side of the fleet (the MQTT link, status, command thread,
telemetry windows into the outbox and their forwarder) is
`connection.FleetConnection`, ``agent.fleet``.
"""

from __future__ import annotations

import enum
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import numpy as np

from edgecore import wire
from edgecore.bundle import Bundle, TrustPolicy
from edgecore.commands import CommandTrust
from edgecore.errors import AgentError
from edgecore.mqtt import DEFAULT_VERSION

from .cloud import BROKER_DOWN, CloudClient, CloudResult, Ticket
from .commands import CommandFn, CommandRegistry
from .connection import FleetConnection
from .drift import DriftConfig
from .model import Inference, LoadedModel, LocalModel, load_model
from .outbox import DropPolicy, Outbox
from .sources import Item
from .telemetry import TelemetryRecorder, WindowCounters, answer_counts
from .updates import ReleaseHistory, check_line, clean_stale, fetch_bundle, open_for_device, prune_bundles

__all__ = ["Agent", "AgentConfig", "Answer", "Route", "load_model", "summarize"]

log = logging.getLogger(__name__)


class Route(str, enum.Enum):
    EDGE = "edge"
    CLOUD = "cloud"
    FALLBACK = "fallback"


_EDGE = Route.EDGE  # module globals for the per-input branch: no attribute lookups there
_new_tuple = tuple.__new__
_F32 = np.dtype(np.float32)


def _as_float32(it: Item) -> np.ndarray:
    try:
        return np.asarray(it.raw, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise AgentError(f"input {it.id}: not a numeric sample ({e})") from e


class Answer(NamedTuple):  # immutable like a frozen dataclass, made in a fifth of the time (one per input)
    id: str
    prediction: Any  # the task's prediction (`Task.decide`): a class index, a list of detections
    label: str
    route: Route
    confidence: float
    latency_s: float
    reason: str | None = None  # why a fallback happened: timeout | broker | error
    true_label: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "prediction": self.prediction, "label": self.label, "route": self.route.value,
            "confidence": self.confidence, "latency_s": self.latency_s, "reason": self.reason,
            "true_label": self.true_label,
        }


@dataclass
class AgentConfig:
    device_id: str
    broker_url: str | None = None  # None: edge only, no cloud, no telemetry
    username: str | None = None
    password: str | None = None
    prefix: str = wire.DEFAULT_PREFIX
    deadline_s: float = 2.0
    telemetry_window_s: float = 10.0
    threshold: float | None = None  # overrides the bundle's routing threshold
    state_dir: Path = field(default_factory=lambda: Path(".device-agent"))
    outbox_max_rows: int = 10000
    drop_policy: DropPolicy = DropPolicy.DROP_OLDEST
    batch_size: int = 1
    threads: int | None = None
    drift: DriftConfig = field(default_factory=DriftConfig)
    mqtt_version: str = DEFAULT_VERSION  # "3.1.1" for brokers without MQTT 5: request metadata then travels in an envelope
    flag_when_drifted: bool = True  # while drift is flagged, ask the gateway to collect offloaded inputs
    # While drift is flagged the model's confidence is no longer calibrated (it can be confidently wrong on the
    # shifted inputs): this share of the inputs it is sure of goes to the cloud too (and is flagged for collection).
    drift_offload: float = 0.25
    # the broker keeps the agent's session (its subscriptions, and the QoS 1 inputs and commands sent meanwhile)
    # this long after it went away; 0: a clean session, what arrives while the agent is away is lost
    session_expiry_s: int = 3600
    # a window leaves the outbox when the gateway acknowledges it stored it ("gateway"), or, for a gateway that
    # does not acknowledge, when the broker took it ("broker"; until a gateway's acknowledgement is first seen)
    telemetry_acked_by: str = "gateway"
    # a window the broker took but no gateway acknowledged is sent again after this
    telemetry_resend_s: float = 30.0
    # folders (a shared mount) whose bundles a ``bench`` job may name by manifest sha256; nothing else on the
    # device's disk is read for a job
    bench_dirs: tuple[Path, ...] = ()
    update_bases: tuple[str, ...] = ()  # update_bundle URLs must be under one of these (none: refused)
    trust: TrustPolicy = field(default_factory=TrustPolicy)  # whose signatures this device accepts
    # whose commands it runs (the gateway's command key; `edgecore.commands`): none and not allow_unsigned refuses all
    command_trust: CommandTrust = field(default_factory=CommandTrust)


class Agent:
    """Runs a verified bundle; ``start()`` connects, ``run(source)`` answers every input."""

    def __init__(self, bundle: Bundle | str | Path, config: AgentConfig, *,
                 commands: Mapping[str, CommandFn] | None = None) -> None:
        self.config = config
        self.topics = wire.Topics(config.device_id, config.prefix)
        config.trust.warn_if_open(f"device agent {config.device_id}")
        if config.broker_url is not None:  # (commands come over MQTT only)
            config.command_trust.warn_if_open(f"device agent {config.device_id}")
        # the nonces of the commands it ran outlive a restart (a replay within a command's lifetime is refused)
        self.command_trust = config.command_trust.with_state(
            config.state_dir / "commands_seen.json" if config.broker_url is not None else None)
        if isinstance(bundle, Bundle):
            clean_stale(config.device_id, config.state_dir)
            opened = config.trust.check(bundle)
        else:  # (a tarball is unpacked under this process's prefix: a start after a kill -9 removes the last one)
            opened = open_for_device(config.trust, bundle, config.device_id, config.state_dir)
        first = load_model(opened, threads=config.threads)
        self.model = LocalModel(first, on_rollback=self._rolled_back)
        # what this device ran, per model line: an update to a lower release is refused (`ReleaseHistory`); the
        # bundle it starts with is the operator's choice, and counts
        self.releases = ReleaseHistory(config.state_dir / "releases.json" if config.broker_url is not None else None)
        self.releases.record(opened)
        if not 0.0 <= config.drift_offload <= 1.0:
            raise AgentError(f"drift_offload must be within 0..1, got {config.drift_offload}")
        self._threshold = self._initial_threshold(first, config.threshold)
        self.cloud = CloudClient(self.topics, deadline_s=config.deadline_s, read_reply=first.task.read_reply)
        self.commands = CommandRegistry(commands)
        outbox: Outbox | None = None
        window = WindowCounters()
        if config.broker_url is not None:  # telemetry: the open window and the outbox live in the state dir
            outbox, window = self._open_state()
        self.telemetry = TelemetryRecorder(first.drift_reference, config.drift, window)
        self.fleet = FleetConnection(self, outbox)  # link, status, commands, telemetry windows

    def _open_state(self) -> tuple[Outbox, WindowCounters]:
        """The outbox, and the open window continued from a crash unless it was already stored."""
        c = self.config
        box = Outbox(c.state_dir / "outbox.sqlite", max_rows=c.outbox_max_rows, policy=c.drop_policy,
                     acked_by=c.telemetry_acked_by)
        window = WindowCounters(c.state_dir / "window.bin")
        if window.seq < 0 or window.seq <= box.last_put_seq:
            window.reset(seq=box.next_seq(), t_start=time.time())
        elif window.counts()["inputs"]:
            log.info("continuing telemetry window %d (%d inputs) from before a restart",
                     window.seq, window.counts()["inputs"])
        return box, window

    # --- model and routing -------------------------------------------------------
    @staticmethod
    def _initial_threshold(model: LoadedModel, override: float | None) -> float:
        if override is not None:
            return float(override)
        if model.threshold is None:
            raise AgentError(f"bundle {model.bundle.name} has no routing threshold; pass --threshold")
        return model.threshold

    @property
    def bundle(self) -> Bundle:
        return self.model.current.bundle

    @property
    def threshold(self) -> float:
        return self._threshold

    @property
    def counts(self) -> dict[str, int]:
        """Cumulative counts since this agent started (inputs, routes, fallback reasons, rollbacks)."""
        return self.telemetry.totals

    @property
    def last_drift(self) -> dict[str, Any] | None:
        return self.telemetry.last_drift

    def set_threshold(self, value: float) -> None:
        try:
            v = float(value)
        except (TypeError, ValueError) as e:
            raise AgentError(f"threshold must be a finite number, got {value!r}") from e
        if not np.isfinite(v):
            raise AgentError(f"threshold must be a finite number, got {value!r}")
        self._threshold = v
        self.fleet.publish_status()

    def swap_bundle(self, bundle: Bundle) -> None:
        """Load, smoke-test and read everything first; then switch (which cannot fail halfway)."""
        new = load_model(bundle, threads=self.config.threads)
        self.model.swap(new)  # checks the input shape first; after it nothing can fail: references and a reset
        if new.threshold is not None:
            self._threshold = new.threshold
        self.telemetry.reset_drift(new.drift_reference)
        log.info("now running bundle %s (%s)", bundle.root, bundle.manifest_sha256[:12])
        self.fleet.publish_status()

    def fetch(self, url: str, *, sha256: str | None = None) -> Bundle:
        """Download and verify a bundle from under the configured update bases into the state dir."""
        return fetch_bundle(url=url, sha256=sha256, state_dir=self.config.state_dir,
                            allowed=self.config.update_bases, trust=self.config.trust)

    def update_from(self, url: str, *, sha256: str | None = None, allow_line_change: bool = False,
                    rollback: bool = False) -> None:
        """Fetch, switch, and keep only the current and previous bundle in the state dir.

        A bundle of another model line (manifest ``model.name``) is refused, the running one kept, unless the
        command says ``allow_line_change``: two models with the same input shape would otherwise swap silently.
        A lower release than this device ran in the line is refused (`ReleaseHistory`), unless the command is a
        ``rollback`` to a bundle it ran before.
        """
        new = self.fetch(url, sha256=sha256)
        what = url.rstrip("/").rsplit("/", 1)[-1]
        try:
            check_line(new, self.bundle.manifest.model.name, allow_line_change, what=what)
            self.releases.check(new, rollback=rollback, what=what)
            self.swap_bundle(new)
            self.releases.record(new)
        except Exception:
            if new.root != self.bundle.root:  # never leave a bundle that failed lying around
                shutil.rmtree(new.root, ignore_errors=True)
            raise
        prev = self.model.previous
        prune_bundles(self.config.state_dir, [self.bundle.root] + ([prev.bundle.root] if prev else []))

    def _rolled_back(self, now: LoadedModel, err: Exception) -> None:
        self.telemetry.count({"rollbacks": 1})
        self.telemetry.reset_drift(now.drift_reference)
        self.fleet.last_cmd = {"cmd": "update_bundle", "ok": False, "error": f"rolled back after live failure: {err}"}
        self.fleet.publish_status()

    # --- answering ------------------------------------------------------------------
    def process(self, items: list[Item]) -> list[Answer]:
        """Answer a batch: local model first, uncertain ones to the cloud within the deadline."""
        if not items:
            return []
        if len(items) == 1:  # a device's usual case: one raw sample, plain Python numbers from the runner on
            it = items[0]
            raw = it.raw
            if type(raw) is not np.ndarray or raw.dtype is not _F32:  # (a sample that is not numbers fails here,
                raw = _as_float32(it)  # not inside the runtime, where it would count as a live failure)
            m, pred, conf, dt = self.model.answer_one(raw)
            tel = self.telemetry
            if m.output_stats is not None:
                tel.observe_outputs(m.task.OUTPUT_STATS, m.output_stats(pred))
            if conf >= self._threshold and not tel.drifting:
                tel.record_edge(dt, conf, raw)
                # the smoke test checked one output per label, so ``pred`` names one; made as a plain tuple:
                # a NamedTuple's own __new__ is a Python function, a third of this branch's cost
                return [_new_tuple(Answer, (it.id, pred, m.label_of(pred), _EDGE, conf, dt, None, it.label))]
            return [self._route_one(it, raw, m, pred, conf, dt)]
        try:
            raw = np.stack([np.asarray(it.raw, dtype=np.float32) for it in items])
        except (TypeError, ValueError) as e:
            raise AgentError(f"inputs {items[0].id}..{items[-1].id}: not numeric samples of one shape ({e})") from e
        inf = self.model.infer(raw)
        self.telemetry.observe(seconds=inf.seconds, confidence=inf.confidence, raw=raw)
        if inf.model.output_stats is not None:
            for pred in inf.preds:
                self.telemetry.observe_outputs(inf.model.task.OUTPUT_STATS, inf.model.output_stats(pred))
        return self._route(items, inf)

    def _route(self, items: list[Item], inf: Inference) -> list[Answer]:
        """Route a scored batch: the uncertain inputs (and, while drifting, a share of the sure ones) to the cloud."""
        drifting = self.telemetry.drifting
        conf = inf.confidence.tolist()
        offload = [i for i, c in enumerate(conf) if self._wants_cloud(c, drifting)]
        cloud = self.cloud.collect({i: self._ask(inf.x[i], conf[i], inf.model, drifting)
                                    for i in offload}) if offload else {}
        preds = inf.preds.tolist() if isinstance(inf.preds, np.ndarray) else inf.preds  # plain Python numbers
        answers = [self._answer(it, preds[i], conf[i], inf.model, inf.seconds, cloud.get(i))
                   for i, it in enumerate(items)]
        self.telemetry.count(answer_counts((a.route.value, a.reason) for a in answers))
        return answers

    def _route_one(self, it: Item, raw: np.ndarray, m: LoadedModel, pred: Any, conf: float, dt: float) -> Answer:
        """`_route` for one input the agent is not sure of (or, while drifting, sure of): no arrays made."""
        tel = self.telemetry
        tel.observe_one(dt, conf, raw)
        drifting = tel.drifting
        if not self._wants_cloud(conf, drifting):
            tel.count_one_edge()
            return Answer(it.id, pred, m.label_of(pred), Route.EDGE, conf, dt, None, it.label)
        if self.cloud.connected:  # what the cloud is sent: the preprocessed input
            ticket = self._ask(m.bundle.input_spec.preprocess(raw[None])[0], conf, m, drifting)
            result = self.cloud.collect({0: ticket})[0]
        else:  # no link: nothing to send, nothing to wait for
            result = BROKER_DOWN
        answer = self._answer(it, pred, conf, m, dt, result)
        tel.count(answer_counts([(answer.route.value, answer.reason)]))
        return answer

    def _wants_cloud(self, conf: float, drifting: bool) -> bool:
        """Uncertain, or, while drifting, every k-th sure input (deterministic, spread over the stream)."""
        return conf < self._threshold or (drifting and self.config.drift_offload > 0 and self._drift_tick())

    def _ask(self, x: np.ndarray, conf: float, model: LoadedModel, drifting: bool) -> Ticket | None:
        """Send one preprocessed sample to the gateway (flagged for collection while drifting): its ticket."""
        return self.cloud.ask(x, confidence=conf, flag=self.config.flag_when_drifted and drifting,
                              bundle=model.bundle.version or model.bundle.manifest_sha256)

    def _drift_tick(self) -> bool:
        self._drift_seen = getattr(self, "_drift_seen", 0) + 1
        return self._drift_seen % max(1, round(1.0 / self.config.drift_offload)) == 0

    def _answer(self, it: Item, pred: Any, conf: float, model: LoadedModel, seconds: float,
                cloud: CloudResult | None) -> Answer:
        route, reason, lat = Route.EDGE, None, seconds
        if cloud is not None and cloud.prediction is None:
            route, reason = Route.FALLBACK, cloud.reason
        elif cloud is not None and cloud.prediction is not None:
            rtt = cloud.rtt_s or 0.0
            self.telemetry.observe_cloud(rtt)
            route, pred, lat = Route.CLOUD, cloud.prediction, seconds + rtt
        return Answer(it.id, pred, model.label(pred), route, conf, lat, reason, it.label)

    def run(self, source: Iterable[Item], *, on_answer: Callable[[Answer], None] | None = None) -> Iterator[Answer]:
        """Answer every item of ``source`` (in batches of ``batch_size``)."""
        batch: list[Item] = []
        for it in source:
            batch.append(it)
            if len(batch) >= self.config.batch_size:
                yield from self._emit(batch, on_answer)
                batch = []
            if self.fleet.stopping.is_set():
                break
        if batch:
            yield from self._emit(batch, on_answer)

    def _emit(self, batch: list[Item], cb: Callable[[Answer], None] | None) -> Iterator[Answer]:
        for a in self.process(batch):
            if cb:
                cb(a)
            yield a

    # --- lifecycle (the fleet side: `connection.FleetConnection`) ------------------------------------------
    def start(self, *, connect_timeout: float = 10.0) -> "Agent":
        """Connect to the fleet (`FleetConnection.start`): the status, commands and telemetry threads."""
        self.fleet.start(connect_timeout=connect_timeout)
        return self

    def stop(self, *, flush_timeout: float = 5.0) -> None:
        """Close the last window, forward what the outbox holds (bounded wait), go offline."""
        self.fleet.stop(flush_timeout=flush_timeout)

    def __enter__(self) -> "Agent":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def summarize(answers: list[Answer]) -> dict[str, Any]:
    """Counts per route, offload fraction and, when labels are known, accuracy."""
    n = len(answers)
    by = {r.value: sum(a.route is r for a in answers) for r in Route}
    out: dict[str, Any] = {"inputs": n, **by, "offload_rate": (by["cloud"] + by["fallback"]) / n if n else 0.0}
    labelled = [a for a in answers if a.true_label is not None]
    if labelled:
        out["accuracy"] = sum(a.prediction == a.true_label for a in labelled) / len(labelled)
    return out
