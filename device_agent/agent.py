"""The device agent: local inference, confidence routing to the cloud, telemetry.

Every input gets an answer tagged with where it came from:
``edge`` (confident enough), ``cloud`` (the gateway answered in time) or
``fallback`` (the cloud was asked but timed out, the broker was gone or the
gateway replied with an error: the device's own prediction, counted).

`Agent` composes small parts and owns their lifecycle: the local model with
rollback (`model.LocalModel`), the cloud client (`cloud.CloudClient`), the
telemetry recorder (`telemetry.TelemetryRecorder`), the outbox and its
forwarder (`outbox`, `forwarder`) and the command registry (`commands`).
"""

from __future__ import annotations

import enum
import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import numpy as np

from edgecore import wire
from edgecore.bundle import Bundle, TrustPolicy
from edgecore.errors import AgentError, BrokerError
from edgecore.mqtt import DEFAULT_VERSION, MqttLink

from .cloud import BROKER_DOWN, CloudClient, CloudResult, Ticket
from .commands import CommandFn, CommandRegistry
from .drift import DriftConfig
from .forwarder import OutboxForwarder
from .model import Inference, LoadedModel, LocalModel, load_model
from .outbox import DropPolicy, Outbox
from .sources import Item, MqttInputSource
from .telemetry import TelemetryRecorder, WindowCounters, answer_counts
from .updates import check_line, fetch_bundle, prune_bundles

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
    prediction: int
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
    update_bases: tuple[str, ...] = ()  # update_bundle URLs must be under one of these (none: refused)
    trust: TrustPolicy = field(default_factory=TrustPolicy)  # whose signatures this device accepts


class Agent:
    """Runs a verified bundle; ``start()`` connects, ``run(source)`` answers every input."""

    def __init__(self, bundle: Bundle | str | Path, config: AgentConfig, *,
                 commands: Mapping[str, CommandFn] | None = None) -> None:
        self.config = config
        self.topics = wire.Topics(config.device_id, config.prefix)
        config.trust.warn_if_open(f"device agent {config.device_id}")
        opened = config.trust.check(bundle) if isinstance(bundle, Bundle) else config.trust.open(bundle)
        first = load_model(opened, threads=config.threads)
        self.model = LocalModel(first, on_rollback=self._rolled_back)
        if not 0.0 <= config.drift_offload <= 1.0:
            raise AgentError(f"drift_offload must be within 0..1, got {config.drift_offload}")
        self._threshold = self._initial_threshold(first, config.threshold)
        self.cloud = CloudClient(self.topics, deadline_s=config.deadline_s)
        self.commands = CommandRegistry(commands)
        self.outbox: Outbox | None = None
        window = WindowCounters()
        if config.broker_url is not None:  # telemetry: the open window and the outbox live in the state dir
            self.outbox, window = self._open_state()
        self.telemetry = TelemetryRecorder(first.drift_reference, config.drift, window)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._cmd_q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.last_cmd: dict[str, Any] | None = None
        self.link: MqttLink | None = None
        self._sources: list[MqttInputSource] = []  # subscribed before the status says online
        self.windows_produced = 0

    def _open_state(self) -> tuple[Outbox, WindowCounters]:
        """The outbox, and the open window continued from a crash unless it was already stored."""
        c = self.config
        box = Outbox(c.state_dir / "outbox.sqlite", max_rows=c.outbox_max_rows, policy=c.drop_policy)
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
        self._publish_status()

    def swap_bundle(self, bundle: Bundle) -> None:
        """Load, smoke-test and read everything first; then switch (which cannot fail halfway)."""
        new = load_model(bundle, threads=self.config.threads)
        self.model.swap(new)  # checks the input shape first; after it nothing can fail: references and a reset
        if new.threshold is not None:
            self._threshold = new.threshold
        self.telemetry.reset_drift(new.drift_reference)
        log.info("now running bundle %s (%s)", bundle.root, bundle.manifest_sha256[:12])
        self._publish_status()

    def fetch(self, url: str, *, sha256: str | None = None) -> Bundle:
        """Download and verify a bundle from under the configured update bases into the state dir."""
        return fetch_bundle(url=url, sha256=sha256, state_dir=self.config.state_dir,
                            allowed=self.config.update_bases, trust=self.config.trust)

    def update_from(self, url: str, *, sha256: str | None = None, allow_line_change: bool = False) -> None:
        """Fetch, switch, and keep only the current and previous bundle in the state dir.

        A bundle of another model line (manifest ``model.name``) is refused, the running one kept, unless the
        command says ``allow_line_change``: two models with the same input shape would otherwise swap silently.
        """
        new = self.fetch(url, sha256=sha256)
        try:
            check_line(new, self.bundle.manifest.model.name, allow_line_change, what=url.rstrip("/").rsplit("/", 1)[-1])
            self.swap_bundle(new)
        except Exception:
            if new.root != self.bundle.root:  # never leave a bundle that failed lying around
                shutil.rmtree(new.root, ignore_errors=True)
            raise
        prev = self.model.previous
        prune_bundles(self.config.state_dir, [self.bundle.root] + ([prev.bundle.root] if prev else []))

    def _rolled_back(self, now: LoadedModel, err: Exception) -> None:
        self.telemetry.count({"rollbacks": 1})
        self.telemetry.reset_drift(now.drift_reference)
        self.last_cmd = {"cmd": "update_bundle", "ok": False, "error": f"rolled back after live failure: {err}"}
        self._publish_status()

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
            if conf >= self._threshold and not tel.drifting:
                tel.record_edge(dt, conf, raw)
                # the smoke test checked one output per label, so ``pred`` names one; made as a plain tuple:
                # a NamedTuple's own __new__ is a Python function, a third of this branch's cost
                return [_new_tuple(Answer, (it.id, pred, m.labels[pred], _EDGE, conf, dt, None, it.label))]
            return [self._route_one(it, raw, m, pred, conf, dt)]
        try:
            raw = np.stack([np.asarray(it.raw, dtype=np.float32) for it in items])
        except (TypeError, ValueError) as e:
            raise AgentError(f"inputs {items[0].id}..{items[-1].id}: not numeric samples of one shape ({e})") from e
        inf = self.model.infer(raw)
        self.telemetry.observe(seconds=inf.seconds, confidence=inf.confidence, raw=raw)
        return self._route(items, inf)

    def _route(self, items: list[Item], inf: Inference) -> list[Answer]:
        """Route a scored batch: the uncertain inputs (and, while drifting, a share of the sure ones) to the cloud."""
        drifting = self.telemetry.drifting
        conf = inf.confidence.tolist()
        offload = [i for i, c in enumerate(conf) if self._wants_cloud(c, drifting)]
        cloud = self.cloud.collect({i: self._ask(inf.x[i], conf[i], inf.model, drifting)
                                    for i in offload}) if offload else {}
        answers = [self._answer(it, int(inf.preds[i]), conf[i], inf.model, inf.seconds, cloud.get(i))
                   for i, it in enumerate(items)]
        self.telemetry.count(answer_counts((a.route.value, a.reason) for a in answers))
        return answers

    def _route_one(self, it: Item, raw: np.ndarray, m: LoadedModel, pred: int, conf: float, dt: float) -> Answer:
        """`_route` for one input the agent is not sure of (or, while drifting, sure of): no arrays made."""
        tel = self.telemetry
        tel.observe_one(dt, conf, raw)
        drifting = tel.drifting
        if not self._wants_cloud(conf, drifting):
            tel.count_one_edge()
            return Answer(it.id, pred, m.labels[pred], Route.EDGE, conf, dt, None, it.label)
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

    def _answer(self, it: Item, pred: int, conf: float, model: LoadedModel, seconds: float,
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
            if self._stop.is_set():
                break
        if batch:
            yield from self._emit(batch, on_answer)

    def _emit(self, batch: list[Item], cb: Callable[[Answer], None] | None) -> Iterator[Answer]:
        for a in self.process(batch):
            if cb:
                cb(a)
            yield a

    def mqtt_source(self, topic: str | None = None, *, wait: float = 10.0) -> MqttInputSource:
        """Inputs from an MQTT topic (default ``<prefix>/<id>/input``).

        Made before ``start()``, its subscription is acknowledged before the status says ``online``, so a feeder
        that waits for ``online`` loses nothing. Made after, this waits (up to ``wait`` s) for the broker's
        acknowledgement while connected.
        """
        if self.config.broker_url is None:
            raise AgentError("an MQTT source needs the agent configured with a broker")
        src = MqttInputSource(topic or self.topics.input, self.bundle.input_spec)
        self._sources.append(src)
        if self.link is not None:
            self.link.subscribe(src.topic, src.push_message, wait=wait)
        return src

    def publish(self, topic: str, msg: dict[str, Any], *, retain: bool = False) -> None:
        """A JSON message at QoS 1 (nothing without a broker)."""
        if self.link is not None:
            self.link.publish(topic, wire.dumps(msg), qos=1, retain=retain)

    def publish_answer(self, answer: Answer) -> None:
        """Answers of MQTT-fed inputs go back on ``<prefix>/<id>/answers`` (QoS 1)."""
        self.publish(self.topics.answers, answer.to_dict())

    # --- telemetry ----------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        assert self.outbox is not None  # only called with a state dir
        b = self.bundle
        return {
            "device_id": self.config.device_id, "boot": self.outbox.boot, "threshold": self._threshold,
            "bundle_sha256": b.manifest_sha256, "model": {"name": b.manifest.model.name, "version": b.version},
            "outbox": self.outbox.stats(),
        }

    def flush_window(self, *, t_end: float | None = None) -> int:
        """Close the open window into the outbox (durably, before counting restarts); returns its seq."""
        box = self.outbox
        if box is None:
            raise AgentError("telemetry windows need the agent configured with a broker")

        def emit(msg: dict[str, Any]) -> int:
            box.put(self.topics.telemetry, wire.dumps({**self._identity(), **msg}),
                    inputs=msg["counts"]["inputs"], seq=msg["seq"])
            return box.next_seq()

        msg = self.telemetry.close_window(t_end=time.time() if t_end is None else t_end, emit=emit)
        self.windows_produced += 1
        return int(msg["seq"])

    def _telemetry_loop(self) -> None:
        """Close a window every ``telemetry_window_s``; sync the open one to disk every second meanwhile."""
        period = self.config.telemetry_window_s
        due = time.monotonic() + period
        while not self._stop.wait(max(0.005, min(1.0, due - time.monotonic()))):
            if time.monotonic() >= due:
                self.flush_window()
                due = time.monotonic() + period
            else:
                self.telemetry.window.sync()

    # --- status and commands ------------------------------------------------------
    @property
    def broker_state(self) -> str:
        """``connected``; ``connecting`` while the broker is away (with the last error); ``none`` without one."""
        link = self.link
        if self.config.broker_url is None:
            return "none"
        if link is not None and link.ready.is_set():
            return "connected"
        why = link.last_error if link is not None else None
        return f"connecting ({why})" if why else "connecting"

    def status(self, state: str = "online") -> dict[str, Any]:
        b = self.bundle
        return {
            "device_id": self.config.device_id, "state": state, "time": time.time(), "broker": self.broker_state,
            "bundle_sha256": b.manifest_sha256, "model": b.manifest.model.name, "version": b.version,
            "target": b.target, "precision": b.precision, "threshold": self._threshold, "last_cmd": self.last_cmd,
        }

    def _publish_status(self) -> None:
        if self.link is not None and self.link.ready.is_set():
            self.publish(self.topics.status, self.status(), retain=True)

    def _on_cmd(self, msg: Any) -> None:
        try:
            self._cmd_q.put(wire.loads(msg.payload))
        except wire.WireError as e:
            self.last_cmd = {"cmd": None, "ok": False, "error": f"bad command: {e}"}
            self._publish_status()

    def _cmd_loop(self) -> None:
        while (cmd := self._cmd_q.get()) is not None:
            self.handle_command(cmd)

    def handle_command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Run one command through its registered handler; the outcome goes into the retained status.

        A command's ``id`` (a string or an integer) comes back in the outcome: the status is also published
        while a command runs (an update publishes the new bundle first), still carrying the previous command's
        outcome, so an operator matches its own command's outcome by ``id``, not by the command's name.
        """
        name = cmd.get("cmd")
        ident = cmd.get("id")
        echo = {"id": ident} if type(ident) in (str, int) and len(str(ident)) <= 128 else {}  # (not a bool)
        try:
            self.commands.get(name)(self, cmd)
            outcome: dict[str, Any] = {"cmd": name, **echo, "ok": True}
        except Exception as e:  # the command thread must survive any command
            log.error("command %s failed: %s", name, e)
            outcome = {"cmd": name, **echo, "ok": False, "error": str(e)}
        self.last_cmd = outcome
        self._publish_status()
        return outcome

    # --- lifecycle ----------------------------------------------------------------
    def start(self, *, connect_timeout: float = 10.0) -> "Agent":
        """Connect, and start the telemetry, outbox and command threads.

        The status says ``online`` once the broker acknowledged the subscriptions (commands, cloud replies, the
        MQTT sources made so far). A broker that cannot be reached does not stop the agent: it answers locally
        (uncertain inputs fall back with reason ``broker``), keeps telemetry in the outbox and connects when the
        broker appears. A refused login or certificate stops it (`AgentError`): retrying cannot fix those.
        """
        c, url = self.config, self.config.broker_url
        if url is None or self.outbox is None:
            return self
        offline = wire.dumps({"device_id": c.device_id, "state": "offline"})
        try:
            link = MqttLink(url=url, client_id=f"agent-{c.device_id}", username=c.username,
                            password=c.password, will=(self.topics.status, offline), mqtt_version=c.mqtt_version,
                            max_inflight=100, anonymous_hint="give --password, $DEVICE_AGENT_PASSWORD or --credentials")
        except BrokerError as e:
            raise AgentError(str(e)) from e
        self.link = link
        self.cloud.attach(link)
        link.subscribe(self.topics.cmd, self._on_cmd)
        for src in self._sources:
            link.subscribe(src.topic, src.push_message)
        link.on_ready(self._publish_status)
        try:
            if not link.start(wait=connect_timeout, offline_ok=True):
                log.warning("device %s answers locally and keeps its telemetry in %s until broker %s answers",
                            c.device_id, self.outbox.path, link.where)
        except BrokerError as e:
            self.link = None
            self.cloud.attach(None)
            raise AgentError(str(e)) from e
        forwarder = OutboxForwarder(self.outbox, self.link, self._stop)
        for fn, name in ((self._telemetry_loop, "telemetry"), (forwarder.run, "outbox"), (self._cmd_loop, "commands")):
            t = threading.Thread(target=fn, name=f"agent-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, *, flush_timeout: float = 5.0) -> None:
        """Close the last window, forward what the outbox holds (bounded wait), go offline."""
        if self.link is None:
            return
        if self.outbox is not None:
            self.flush_window()
            # a broker never reached is not waited for: the rows go first at the next start
            end = time.monotonic() + (flush_timeout if self.link.generation else 0.0)
            while len(self.outbox) and time.monotonic() < end:  # also rides out a reconnect
                time.sleep(0.02)
            left = len(self.outbox)
            if left:  # nothing is lost: they stay on disk and go first at the next start
                log.warning("stopping with %d message(s) the broker has not confirmed within %.0f s; they stay in "
                            "the outbox (%s) and are sent at the next start", left, flush_timeout, self.outbox.path)
        self._stop.set()
        self._cmd_q.put(None)
        for t in self._threads:
            t.join(timeout=15)
        self.telemetry.window.sync()
        if self.link.connected.is_set():
            info = self.link.publish(self.topics.status, wire.dumps(self.status("offline")), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError):
                pass
        self.link.stop()
        self.cloud.attach(None)
        if self.outbox is not None:
            self.outbox.close()
        self.link = None

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
