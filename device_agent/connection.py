"""The agent's side of the fleet: its MQTT link, the status it announces, the commands it takes, and the
telemetry windows it closes into the outbox and forwards.

`agent.Agent` answers inputs (the model, routing, the cloud client, telemetry counting); `FleetConnection`
connects it: ``Agent.start``/``stop`` run its lifecycle, and it reads the agent's model, threshold and counters
for the status and the windows it sends. Nothing here is on the per-input path.
"""

from __future__ import annotations

import errno
import json
import logging
import queue
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Any

from edgecore import wire
from edgecore.errors import AgentError, BrokerError
from edgecore.mqtt import MqttLink

from .forwarder import OutboxForwarder
from .outbox import Outbox
from .sources import MqttInputSource

if TYPE_CHECKING:  # pragma: no cover
    from .agent import Agent, Answer

log = logging.getLogger(__name__)


def storage_problem(e: BaseException) -> str:
    """What a failed write says in the status: ``disk full``, or the error's kind (never a path)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk full"
    if isinstance(e, sqlite3.Error) and "full" in str(e).lower():  # SQLITE_FULL: "database or disk is full"
        return "disk full"
    if isinstance(e, OSError) and e.strerror:
        return f"cannot write the state dir: {e.strerror.lower()}"
    return f"cannot write the state dir: {type(e).__name__}"


def _echo_id(cmd: dict[str, Any]) -> dict[str, Any]:
    """``{"id": ...}`` of a command (a string or an integer, not a bool), read inside a signed envelope too: an
    operator (a rollout) matches the outcome, a refusal included, to its own command by it."""
    if isinstance(cmd.get("signed"), str) and len(cmd["signed"]) <= 65536:
        try:
            inner = json.loads(cmd["signed"])
        except ValueError:
            return {}
        cmd = inner if isinstance(inner, dict) else {}
    ident = cmd.get("id")
    return {"id": ident} if type(ident) in (str, int) and len(str(ident)) <= 128 else {}


class FleetConnection:
    """The link, status, commands and telemetry windows of one `Agent` (``agent.fleet``)."""

    def __init__(self, agent: "Agent", outbox: Outbox | None) -> None:
        self.agent = agent
        self.config = agent.config
        self.topics = agent.topics
        self.outbox = outbox  # None: no broker configured, no telemetry
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._cmd_q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.last_cmd: dict[str, Any] | None = None
        self.link: MqttLink | None = None
        self._sources: list[MqttInputSource] = []  # subscribed before the status says online
        self.windows_produced = 0
        self._last_inputs: dict[str, int] | None = None  # the input counts the last status published
        # or "degraded (disk full)" while windows cannot be stored, "waiting (…)" while no gateway acknowledges them
        self.telemetry_state = "ok"

    def mqtt_source(self, topic: str | None = None, *, wait: float = 10.0) -> MqttInputSource:
        """Inputs from an MQTT topic (default ``<prefix>/<id>/input``).

        Made before ``start()``, its subscription is acknowledged before the status says ``online``, so a feeder
        that waits for ``online`` loses nothing. Made after, this waits (up to ``wait`` s) for the broker's
        acknowledgement while connected.
        """
        if self.config.broker_url is None:
            raise AgentError("an MQTT source needs the agent configured with a broker")
        src = MqttInputSource(topic or self.topics.input, self.agent.bundle.input_spec,
                              reply=lambda body: self.publish(self.topics.answers, body))
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
        b = self.agent.bundle
        return {
            "device_id": self.config.device_id, "boot": self.outbox.boot, "threshold": self.agent.threshold,
            "bundle_sha256": b.manifest_sha256, "model": {"name": b.manifest.model.name, "version": b.version},
            "outbox": self.outbox.stats(),
        }

    def flush_window(self, *, t_end: float | None = None) -> int:
        """Close the open window into the outbox (durably, before counting restarts); returns its seq."""
        box = self.outbox
        if box is None:
            raise AgentError("telemetry windows need the agent configured with a broker")

        def emit(msg: dict[str, Any]) -> int:
            if box.last_put_seq < msg["seq"]:  # (stored by an attempt that failed after it: not twice)
                box.put(self.topics.telemetry, wire.dumps({**self._identity(), **msg}),
                        inputs=msg["counts"]["inputs"], seq=msg["seq"])
            return box.next_seq()

        msg = self.agent.telemetry.close_window(t_end=time.time() if t_end is None else t_end, emit=emit)
        self.windows_produced += 1
        return int(msg["seq"])

    def _telemetry_loop(self) -> None:
        """Close a window every ``telemetry_window_s``; sync the open one to disk every second meanwhile."""
        period = self.config.telemetry_window_s
        due = time.monotonic() + period
        while not self.stopping.wait(max(0.005, min(1.0, due - time.monotonic()))):
            try:
                if time.monotonic() >= due:
                    self.flush_window()
                    due = time.monotonic() + period
                else:
                    self.agent.telemetry.window.sync()
            except (OSError, sqlite3.Error) as e:  # a full disk: keep counting, say so, try again next tick
                self._telemetry_failed(e)
            else:
                self._telemetry_ok()
            self._publish_if_changed()

    def _unacknowledged(self) -> str | None:
        """What the status says while windows the broker took stay unacknowledged past two resends: no
        gateway stores them (none running, or one that does not acknowledge). Nothing is lost meanwhile: they
        wait in the outbox, within its bound."""
        box = self.outbox
        if box is None:
            return None
        try:
            n = box.overdue(2 * self.config.telemetry_resend_s)
        except sqlite3.Error:
            return None
        if not n:
            return None
        hint = "" if box.acks_from_gateway else (" (no gateway has acknowledged a window yet: is one running? "
                                                 "For a gateway that does not acknowledge: telemetry_acked_by "
                                                 "= broker)")
        return f"waiting (windows not acknowledged by a gateway{hint})"

    def _telemetry_failed(self, e: BaseException) -> None:
        """The window could not be stored: the open window keeps counting (nothing is lost while the disk is
        full), the status says ``telemetry: degraded (…)``, and the next tick tries again."""
        state = f"degraded ({storage_problem(e)})"
        if state != self.telemetry_state:
            log.error("telemetry windows cannot be stored (%s: %s); still counting, retrying every second",
                      type(e).__name__, e)
            self.telemetry_state = state
            self.publish_status()

    def _telemetry_ok(self) -> None:
        state = self._unacknowledged() or "ok"
        if state != self.telemetry_state:
            if self.telemetry_state.startswith("degraded"):
                log.warning("telemetry windows are stored again")
            elif state != "ok":
                log.warning("telemetry: %s", state)
            self.telemetry_state = state
            self.publish_status()

    def _publish_if_changed(self) -> None:
        """Republish the status when what it reports of the inputs changed (at most once a tick)."""
        seen = self.input_counts() if self._sources else None
        if seen != self._last_inputs:
            self._last_inputs = seen
            self.publish_status()

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
        b = self.agent.bundle
        return {
            "device_id": self.config.device_id, "state": state, "time": time.time(), "broker": self.broker_state,
            "bundle_sha256": b.manifest_sha256, "model": b.manifest.model.name, "version": b.version,
            "target": b.target, "precision": b.precision, "threshold": self.agent.threshold, "last_cmd": self.last_cmd,
            "telemetry": self.telemetry_state if self.outbox is not None else "none",
            **({"inputs": self.input_counts()} if self._sources else {}),
        }

    def input_counts(self) -> dict[str, int]:
        """What the MQTT sources never gave the model: ``rejected``/``refused`` messages, ``dropped`` inputs."""
        total = {"rejected": 0, "refused": 0, "dropped": 0}
        for src in self._sources:
            for k, v in src.counts().items():
                total[k] += v
        return total

    def publish_status(self) -> None:
        if self.link is not None and self.link.ready.is_set():
            self.publish(self.topics.status, self.status(), retain=True)

    def _on_telemetry_ack(self, msg: Any) -> None:
        """The gateway stored a window (``ok``) or refused it for good: it leaves the outbox."""
        box = self.outbox
        try:
            ack = wire.loads(msg.payload)
            boot, seq, stored = ack.get("boot"), ack.get("seq"), ack.get("ok") is not False
            if box is None or not isinstance(boot, str) or type(seq) is not int:
                return
            if box.gateway_acked(boot, seq, stored=stored) and not stored:
                log.error("the gateway refused telemetry window %s for good: %s", seq, ack.get("error"))
        except (wire.WireError, OSError, sqlite3.Error) as e:  # a bad ack, or a full disk: the row is sent again
            log.warning("telemetry acknowledgement not applied: %s", e)

    def _on_cmd(self, msg: Any) -> None:
        try:
            self._cmd_q.put(wire.loads(msg.payload))
        except wire.WireError as e:
            self.last_cmd = {"cmd": None, "ok": False, "error": f"bad command: {e}"}
            self.publish_status()

    def _cmd_loop(self) -> None:
        while (payload := self._cmd_q.get()) is not None:
            self.handle_signed(payload)

    def handle_signed(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A command as it arrived over MQTT: run only when the agent's `CommandTrust` opens it (signed by a
        trusted command key, for this device, not expired, not replayed); a refusal is the outcome."""
        try:
            cmd = self.agent.command_trust.open(payload, device=self.agent.config.device_id)
        except AgentError as e:
            log.error("command refused: %s", e)
            self.last_cmd = {"cmd": None, **_echo_id(payload), "ok": False, "error": f"refused: {e}"}
            self.publish_status()
            return self.last_cmd
        return self.handle_command(cmd)

    def handle_command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Run one command through its registered handler; the outcome goes into the retained status.

        A command's ``id`` (a string or an integer) comes back in the outcome: the status is also published
        while a command runs (an update publishes the new bundle first), still carrying the previous command's
        outcome, so an operator matches its own command's outcome by ``id``, not by the command's name.
        """
        name = cmd.get("cmd")
        echo = _echo_id(cmd)
        try:
            self.agent.commands.get(name)(self.agent, cmd)
            outcome: dict[str, Any] = {"cmd": name, **echo, "ok": True}
        except Exception as e:  # the command thread must survive any command
            log.error("command %s failed: %s", name, e)
            outcome = {"cmd": name, **echo, "ok": False, "error": str(e)}
        self.last_cmd = outcome
        self.publish_status()
        return outcome

    # --- lifecycle ----------------------------------------------------------------
    def start(self, *, connect_timeout: float = 10.0) -> None:
        """Connect, and start the telemetry, outbox and command threads.

        The status says ``online`` once the broker acknowledged the subscriptions (commands, cloud replies, the
        MQTT sources made so far). A broker that cannot be reached does not stop the agent: it answers locally
        (uncertain inputs fall back with reason ``broker``), keeps telemetry in the outbox and connects when the
        broker appears. A refused login or certificate stops it (`AgentError`): retrying cannot fix those.
        """
        c, url = self.config, self.config.broker_url
        if url is None or self.outbox is None:
            return
        offline = wire.dumps({"device_id": c.device_id, "state": "offline"})
        try:
            link = MqttLink(url=url, client_id=f"agent-{c.device_id}", username=c.username,
                            password=c.password, will=(self.topics.status, offline), mqtt_version=c.mqtt_version,
                            max_inflight=100, session_expiry_s=c.session_expiry_s,
                            anonymous_hint="give --password, $DEVICE_AGENT_PASSWORD or --credentials")
        except BrokerError as e:
            raise AgentError(str(e)) from e
        self.link = link
        self.agent.cloud.attach(link)
        link.subscribe(self.topics.cmd, self._on_cmd)
        link.subscribe(self.topics.telemetry_ack, self._on_telemetry_ack)
        for src in self._sources:
            link.subscribe(src.topic, src.push_message)
        link.on_ready(self.publish_status)
        try:
            if not link.start(wait=connect_timeout, offline_ok=True):
                log.warning("device %s answers locally and keeps its telemetry in %s until broker %s answers",
                            c.device_id, self.outbox.path, link.where)
        except BrokerError as e:
            self.link = None
            self.agent.cloud.attach(None)
            raise AgentError(str(e)) from e
        forwarder = OutboxForwarder(self.outbox, self.link, self.stopping, resend_after_s=c.telemetry_resend_s)
        for fn, name in ((self._telemetry_loop, "telemetry"), (forwarder.run, "outbox"), (self._cmd_loop, "commands")):
            t = threading.Thread(target=fn, name=f"agent-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, *, flush_timeout: float = 5.0) -> None:
        """Close the last window, forward what the outbox holds (bounded wait), go offline."""
        if self.link is None:
            return
        if self.outbox is not None:
            try:
                self.flush_window()
            except (OSError, sqlite3.Error) as e:  # the open window stays in its file: continued at the next start
                log.error("the last telemetry window could not be stored (%s); it is continued at the next start", e)
            # a broker never reached is not waited for: the rows go first at the next start
            end = time.monotonic() + (flush_timeout if self.link.generation else 0.0)
            while len(self.outbox) and time.monotonic() < end:  # also rides out a reconnect
                time.sleep(0.02)
            left = len(self.outbox)
            if left:  # nothing is lost: they stay on disk and go first at the next start
                log.warning("stopping with %d message(s) the broker has not confirmed within %.0f s; they stay in "
                            "the outbox (%s) and are sent at the next start", left, flush_timeout, self.outbox.path)
        self.stopping.set()
        self._cmd_q.put(None)
        for t in self._threads:
            t.join(timeout=15)
        self.agent.telemetry.window.sync()
        if self.link.connected.is_set():
            info = self.link.publish(self.topics.status, wire.dumps(self.status("offline")), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError):
                pass
        self.link.stop()
        self.agent.cloud.attach(None)
        if self.outbox is not None:
            self.outbox.close()
        self.link = None

