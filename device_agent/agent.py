"""The device agent: local inference, confidence routing to the cloud, telemetry.

Every input gets an answer tagged with where it came from:
``edge`` (confident enough), ``cloud`` (the gateway answered in time) or
``fallback`` (the cloud was asked but timed out, the broker was gone or the
gateway replied with an error: the device's own prediction, counted).
"""

from __future__ import annotations

import enum
import json
import logging
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from edgecore import wire
from edgecore.bundle import Bundle, open_bundle
from edgecore.errors import AgentError, BundleTrustError, EdgeError
from edgecore.manifest import Routing
from targets import load_runner

from .drift import DriftConfig, DriftMonitor
from .histogram import LatencyHistogram
from .outbox import DropPolicy, Outbox
from .sources import Item, MqttInputSource
from .transport import MqttLink
from .updates import fetch_bundle, smoke_test

log = logging.getLogger(__name__)


class Route(str, enum.Enum):
    EDGE = "edge"
    CLOUD = "cloud"
    FALLBACK = "fallback"


@dataclass(frozen=True)
class Answer:
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
    prefix: str = "fleet"
    deadline_s: float = 2.0
    telemetry_window_s: float = 10.0
    threshold: float | None = None  # overrides the bundle's routing threshold
    state_dir: Path = field(default_factory=lambda: Path(".device-agent"))
    outbox_max_rows: int = 10000
    drop_policy: DropPolicy = DropPolicy.DROP_OLDEST
    batch_size: int = 1
    threads: int | None = None
    drift: DriftConfig = field(default_factory=DriftConfig)
    mqtt_version: str = "5"  # "3.1.1" for brokers without MQTT 5: request metadata then travels in an envelope


@dataclass(frozen=True)
class _Model:
    bundle: Bundle
    runner: Any
    measure: str
    temperature: float


class _Pending:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: dict[str, Any] | None = None


def load_model(bundle: Bundle, *, threads: int | None = None) -> _Model:
    """Load with this device's runtime and answer a smoke input, or raise an `EdgeError`."""
    try:
        runner = load_runner(bundle, threads=threads)
    except EdgeError:
        raise
    except Exception as e:  # runtimes raise their own types for corrupt artifacts
        raise BundleTrustError(f"bundle {bundle.root} failed to load: {type(e).__name__}: {e}") from e
    smoke_test(bundle, runner)
    r = bundle.routing or Routing()
    return _Model(bundle, runner, r.measure, r.temperature)


class Agent:
    """Runs a verified bundle; ``start()`` connects, ``run(source)`` answers every input."""

    def __init__(self, bundle: Bundle | str | Path, config: AgentConfig) -> None:
        from edgecore.confidence import confidence

        self._confidence = confidence
        self.config = config
        self.topics = wire.Topics(config.device_id, config.prefix)
        b = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        self._model = load_model(b, threads=config.threads)
        self._previous: _Model | None = None
        self._threshold = self._initial_threshold(b, config.threshold)
        self._lock = threading.Lock()
        self.counts = {"inputs": 0, "edge": 0, "cloud": 0, "fallback": 0, "fallback_timeout": 0,
                       "fallback_broker": 0, "fallback_error": 0, "rollbacks": 0}
        self._window = dict.fromkeys(self.counts, 0)
        self.edge_latency = LatencyHistogram()
        self.cloud_latency = LatencyHistogram()
        self.drift = DriftMonitor(b.drift_reference(), config.drift)
        self.last_drift: dict[str, Any] | None = None
        self._pending: dict[bytes, _Pending] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._cmd_q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.last_cmd: dict[str, Any] | None = None
        self.link: MqttLink | None = None
        self.outbox: Outbox | None = None
        self.windows_produced = 0

    # --- model and routing -------------------------------------------------------
    @staticmethod
    def _initial_threshold(bundle: Bundle, override: float | None) -> float:
        if override is not None:
            return float(override)
        if bundle.routing is None:
            raise AgentError(f"bundle {bundle.root} has no routing threshold; pass --threshold")
        return bundle.routing.threshold

    @property
    def bundle(self) -> Bundle:
        return self._model.bundle

    @property
    def threshold(self) -> float:
        return self._threshold

    def set_threshold(self, value: float) -> None:
        v = float(value)
        if not np.isfinite(v):
            raise AgentError(f"threshold must be a finite number, got {value!r}")
        self._threshold = v
        self._publish_status()

    def swap_bundle(self, bundle: Bundle) -> None:
        """Load, smoke-test, then swap atomically; the old model is kept for rollback."""
        new = load_model(bundle, threads=self.config.threads)
        if new.bundle.input_spec.sample_shape != self._model.bundle.input_spec.sample_shape:
            raise AgentError("the new bundle takes a different input shape than this device's source")
        with self._lock:
            self._previous, self._model = self._model, new
            if bundle.routing is not None:
                self._threshold = bundle.routing.threshold
        self.drift.reset(bundle.drift_reference())
        log.info("now running bundle %s (%s)", bundle.root, bundle.manifest_sha256[:12])
        self._publish_status()

    def _rollback(self, err: Exception) -> _Model:
        with self._lock:
            if self._previous is None:
                raise AgentError(f"the bundle failed on a live input and there is none to roll back to: {err}") from err
            bad, self._model, self._previous = self._model, self._previous, None
            self.counts["rollbacks"] += 1
            self._window["rollbacks"] += 1
        self.drift.reset(self._model.bundle.drift_reference())
        log.error("bundle %s failed on a live input (%s); rolled back", bad.bundle.root, err)
        self.last_cmd = {"cmd": "update_bundle", "ok": False, "error": f"rolled back after live failure: {err}"}
        self._publish_status()
        return self._model

    def _infer(self, raw: np.ndarray) -> tuple[_Model, np.ndarray, np.ndarray, np.ndarray, float]:
        """(model used, its preprocessed input, logits, confidence, seconds); rolls back on a live failure."""
        m = self._model
        t0 = time.perf_counter()  # on-device latency counts preprocessing too
        x = m.bundle.input_spec.preprocess(raw)
        try:
            logits = np.asarray(m.runner.run(x))
        except Exception as e:
            if isinstance(e, EdgeError) and self._previous is None:
                raise
            m = self._rollback(e)
            t0 = time.perf_counter()
            x = m.bundle.input_spec.preprocess(raw)  # the previous bundle may normalise differently
            logits = np.asarray(m.runner.run(x))
        dt = time.perf_counter() - t0
        conf = self._confidence(logits, measure=m.measure, temperature=m.temperature)
        return m, x, logits, np.asarray(conf, dtype=np.float64), dt

    def process(self, items: list[Item]) -> list[Answer]:
        """Answer a batch: local model first, uncertain ones to the cloud within the deadline."""
        if not items:
            return []
        raw = np.stack([it.raw for it in items]).astype(np.float32, copy=False)
        m, x, logits, conf, dt = self._infer(raw)
        self.edge_latency.observe(dt)
        self.drift.observe(confidence=conf, raw=raw)
        preds = logits.argmax(axis=1)
        labels = m.bundle.labels
        offload = conf < self._threshold
        sent: dict[int, tuple[bytes, _Pending, float]] = {}
        broker_down: set[int] = set()
        for i in np.flatnonzero(offload):
            got = self._send_request(x[i])
            if got is None:
                broker_down.add(int(i))
            else:
                sent[int(i)] = got
        deadline = time.monotonic() + self.config.deadline_s
        answers: list[Answer] = []
        for i, it in enumerate(items):
            route, pred, reason, lat = Route.EDGE, int(preds[i]), None, dt
            if i in broker_down:
                route, reason = Route.FALLBACK, "broker"
            elif i in sent:
                corr, pend, t_sent = sent[i]
                pend.event.wait(max(0.0, deadline - time.monotonic()))
                self._pending.pop(corr, None)
                rep = pend.reply
                if rep is None:
                    route, reason = Route.FALLBACK, "timeout"
                elif not rep.get("ok") or not isinstance(rep.get("prediction"), int):
                    route, reason = Route.FALLBACK, "error"
                else:
                    rtt = float(rep["_received"]) - t_sent
                    self.cloud_latency.observe(rtt)
                    route, pred, lat = Route.CLOUD, int(rep["prediction"]), dt + rtt
            label = labels[pred] if 0 <= pred < len(labels) else str(pred)
            answers.append(Answer(it.id, pred, label, route, float(conf[i]), lat, reason, it.label))
        with self._lock:
            for a in answers:
                for k in ("inputs", a.route.value) + ((f"fallback_{a.reason}",) if a.reason else ()):
                    self.counts[k] += 1
                    self._window[k] += 1
        return answers

    def _send_request(self, x: np.ndarray) -> tuple[bytes, _Pending, float] | None:
        link = self.link
        if link is None or not link.connected.is_set():
            return None
        corr = uuid.uuid4().bytes
        pend = _Pending()
        self._pending[corr] = pend
        payload = wire.encode_tensor(x[None])
        if not link.v5:
            payload = wire.encode_request(payload, correlation=corr, response_topic=self.topics.resp)
        info = link.publish(
            self.topics.req, payload, qos=1, response_topic=self.topics.resp,
            correlation=corr, expiry_s=max(1, int(np.ceil(self.config.deadline_s))),
        )
        if info.rc != 0:
            self._pending.pop(corr, None)
            return None
        return corr, pend, time.perf_counter()

    def _on_response(self, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props else None
        try:
            rep = wire.loads(msg.payload)
        except wire.WireError as e:
            rep = {"ok": False, "error": str(e)}
        if not corr and isinstance(rep.get("correlation"), str):  # MQTT 3.1.1: echoed in the body
            try:
                corr = bytes.fromhex(rep["correlation"])
            except ValueError:
                return
        pend = self._pending.get(bytes(corr)) if corr else None
        if pend is None:
            return  # late (after its deadline) or unknown: the input was already answered
        rep["_received"] = time.perf_counter()
        pend.reply = rep
        pend.event.set()

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

    def mqtt_source(self, topic: str | None = None) -> "MqttInputSource":
        """Inputs from an MQTT topic (default ``<prefix>/<id>/input``); needs ``start()`` first."""
        from .sources import MqttInputSource

        if self.link is None:
            raise AgentError("an MQTT source needs the agent started with a broker")
        src = MqttInputSource(topic or f"{self.topics.prefix}/{self.config.device_id}/input",
                              self._model.bundle.input_spec)
        self.link.subscribe(src.topic, lambda m: src.push(m.payload))
        return src

    def publish_answer(self, answer: Answer) -> None:
        """Answers of MQTT-fed inputs go back on ``<prefix>/<id>/answers`` (QoS 1)."""
        if self.link is not None:
            self.link.publish(self.topics.answers, wire.dumps(answer.to_dict()), qos=1)

    # --- telemetry ----------------------------------------------------------------
    def telemetry_window(self, *, t_start: float, t_end: float) -> dict[str, Any]:
        with self._lock:
            w, self._window = self._window, dict.fromkeys(self.counts, 0)
        edge = self.edge_latency.snapshot_and_reset()
        cloud = self.cloud_latency.snapshot_and_reset()
        n = w["inputs"]
        drift = self.drift.scores()
        self.last_drift = drift
        return {
            "device_id": self.config.device_id,
            "t_start": t_start, "t_end": t_end,
            "counts": w,
            "offload_rate": (w["cloud"] + w["fallback"]) / n if n else 0.0,
            "fallback_rate": w["fallback"] / n if n else 0.0,
            "latency": {"edge": edge.summary(), "cloud_rtt": cloud.summary()},
            "drift": drift,
            "threshold": self._threshold,
            "bundle_sha256": self.bundle.manifest_sha256,
            "model": {"name": self.bundle.manifest.model.name, "version": self.bundle.version},
            "outbox": {"dropped": self.outbox.dropped if self.outbox else 0,
                       "queued": len(self.outbox) if self.outbox else 0},
        }

    def _telemetry_loop(self) -> None:
        t_start = time.time()
        while not self._stop.wait(self.config.telemetry_window_s):
            t_end = time.time()
            self.flush_window(t_start=t_start, t_end=t_end)
            t_start = t_end

    def flush_window(self, *, t_start: float, t_end: float) -> int:
        """Close the current window and queue it in the outbox; returns its sequence number."""
        assert self.outbox is not None  # only called while started
        seq = self.outbox.next_seq()
        msg = self.telemetry_window(t_start=t_start, t_end=t_end)
        msg["seq"] = seq
        self.outbox.put(self.topics.telemetry, wire.dumps(msg))
        self.windows_produced += 1
        return seq

    def _forward_loop(self) -> None:
        """Oldest first, one at a time; a row leaves the outbox only after its PUBACK."""
        assert self.outbox is not None and self.link is not None
        link, box = self.link, self.outbox
        while not self._stop.is_set():
            row = box.peek()
            if row is None or not link.connected.wait(0.2):
                self._stop.wait(0.05)
                continue
            row_id, topic, payload = row
            gen = link.generation
            info = link.publish(topic, payload, qos=1)
            t0 = time.monotonic()
            while not self._stop.is_set():
                if info.is_published():
                    box.ack(row_id)
                    break
                if link.generation != gen or time.monotonic() - t0 > 10.0:
                    break  # reconnected (or stuck): publish the row again
                time.sleep(0.01)

    # --- status and commands ------------------------------------------------------
    def status(self, state: str = "online") -> dict[str, Any]:
        b = self.bundle
        return {
            "device_id": self.config.device_id, "state": state, "time": time.time(),
            "bundle_sha256": b.manifest_sha256, "model": b.manifest.model.name, "version": b.version,
            "target": b.target, "precision": b.precision, "threshold": self._threshold, "last_cmd": self.last_cmd,
        }

    def _publish_status(self) -> None:
        if self.link is not None and self.link.connected.is_set():
            self.link.publish(self.topics.status, wire.dumps(self.status()), qos=1, retain=True)

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
        """Run one command; the outcome goes into the retained status (and bench results to .../bench)."""
        name = cmd.get("cmd")
        try:
            if name == "set_threshold":
                self.set_threshold(cmd.get("threshold"))  # type: ignore[arg-type]
            elif name == "update_bundle":
                url = cmd.get("url")
                if not isinstance(url, str):
                    raise AgentError("update_bundle needs a 'url'")
                new = fetch_bundle(url=url, sha256=cmd.get("sha256"), state_dir=self.config.state_dir)
                try:
                    self.swap_bundle(new)
                except Exception:
                    if new.root != self.bundle.root:  # never leave a bundle that failed lying around
                        shutil.rmtree(new.root, ignore_errors=True)
                    raise
            elif name == "bench":
                self._run_bench(cmd)
            else:
                raise AgentError(f"unknown command {name!r} (set_threshold, update_bundle, bench)")
            outcome: dict[str, Any] = {"cmd": name, "ok": True}
        except Exception as e:  # the command thread must survive any command
            log.error("command %s failed: %s", name, e)
            outcome = {"cmd": name, "ok": False, "error": str(e)}
        self.last_cmd = outcome
        self._publish_status()
        return outcome

    def _run_bench(self, job: dict[str, Any]) -> None:
        """Resolve the job's bundle, run ``hw_bench.job.run_job`` and publish the result."""
        reply: dict[str, Any] = {"job_id": job.get("job_id"), "device_id": self.config.device_id}
        try:
            if job.get("bundle_url"):
                bundle = fetch_bundle(url=job["bundle_url"], sha256=job.get("sha256"), state_dir=self.config.state_dir)
            elif job.get("bundle_path"):
                bundle = open_bundle(job["bundle_path"])
            else:
                bundle = self.bundle
            from hw_bench.job import (
                run_job,  # lazy: the bench helper's torch-free runner core
            )

            reply.update(ok=True, result=run_job(job, bundle))
        except Exception as e:  # the operator must get an answer, whatever failed
            reply.update(ok=False, error=f"{type(e).__name__}: {e}")
        if self.link is not None:
            self.link.publish(self.topics.bench, wire.dumps(reply), qos=1)
        if not reply["ok"]:
            raise AgentError(reply["error"])

    # --- lifecycle ----------------------------------------------------------------
    def start(self, *, connect_timeout: float = 10.0) -> "Agent":
        if self.config.broker_url is None:
            return self
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(self.config.state_dir / "outbox.sqlite", max_rows=self.config.outbox_max_rows,
                             policy=self.config.drop_policy)
        offline = wire.dumps({"device_id": self.config.device_id, "state": "offline"})
        self.link = MqttLink(url=self.config.broker_url, client_id=f"agent-{self.config.device_id}",
                             username=self.config.username, password=self.config.password,
                             will=(self.topics.status, offline), mqtt_version=self.config.mqtt_version)
        self.link.subscribe(self.topics.resp, self._on_response)
        self.link.subscribe(self.topics.cmd, self._on_cmd)
        self.link.on_connect(self._publish_status)
        self.link.start(wait=connect_timeout)
        for fn, name in ((self._telemetry_loop, "telemetry"), (self._forward_loop, "outbox"),
                         (self._cmd_loop, "commands")):
            t = threading.Thread(target=fn, name=f"agent-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, *, flush_timeout: float = 5.0) -> None:
        """Close the last window, forward what the outbox holds (bounded wait), go offline."""
        if self.link is None:
            return
        if self.outbox is not None:
            self.flush_window(t_start=time.time(), t_end=time.time())
            end = time.monotonic() + flush_timeout
            while len(self.outbox) and time.monotonic() < end:  # also rides out a reconnect
                time.sleep(0.02)
        self._stop.set()
        self._cmd_q.put(None)
        for t in self._threads:
            t.join(timeout=15)
        if self.link.connected.is_set():
            info = self.link.publish(self.topics.status, wire.dumps(self.status("offline")), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError):
                pass
        self.link.stop()
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


def dump_answers(answers: Iterable[Answer], path: Path) -> None:
    with open(path, "w") as f:
        for a in answers:
            f.write(json.dumps(a.to_dict()) + "\n")
