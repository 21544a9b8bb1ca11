"""One gateway replica: MQTT worker + telemetry store + HTTP API in one process.

The HTTP API runs on waitress, a production WSGI server that is pure Python:
it runs in a thread of this process next to the MQTT worker (gunicorn would
fork its own master and workers and does not run on Windows), on every OS,
with bounded request bodies, channel time-outs and a fixed thread pool.
"""

from __future__ import annotations

import errno
import http
import json
import logging
import math
import threading
from pathlib import Path
from typing import Any, Callable

from flask import Flask
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import create_server
from waitress.utilities import Error as WaitressError
from waitress.utilities import RequestEntityTooLarge

from edgecore import wire
from edgecore.commands import MAX_TTL_S, seal
from edgecore.errors import GatewayError
from edgecore.signing import load_private_key

from .api import API_CSP, BODY_GATE, MAX_BUNDLE_BYTES, create_app
from .collection import SampleCollector
from .config import GatewayConfig
from .evaluate import CandidateEvaluator
from .leader import Leadership
from .policy import PolicyEngine
from .rollout import RolloutManager
from .store import GatewayStore
from .teacher import Teacher, load_teacher
from .worker import GatewayWorker

log = logging.getLogger(__name__)


class _JsonError(WaitressError):  # type: ignore[misc]
    """An answer the server gives before the app sees the request, as JSON like every API error."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.reason = code, http.HTTPStatus(code).phrase

    def to_response(self, ident: str | None = None) -> tuple[str, list[tuple[str, str]], bytes]:
        body = json.dumps({"ok": False, "error": self.body}).encode()
        return (f"{self.code} {self.reason}",
                [("Content-Type", "application/json"), ("Content-Security-Policy", API_CSP),
                 ("X-Content-Type-Options", "nosniff")], body)


def _gated_channel(gate: Callable[[str], tuple[int, str] | None] | None) -> type[HTTPChannel]:
    """A waitress channel whose parser decides from the headers alone, before any body byte is read:
    a body past the bundle limit is a 413 and a body without the right token a 401 (or 403 with writes
    off), answered at once, the connection then closed; the body is never buffered to memory or disk."""

    class GatedParser(HTTPRequestParser):  # type: ignore[misc]
        def received(self, data: bytes) -> int:
            before = self.headers_finished
            n: int = super().received(data)
            if before or not self.headers_finished:
                return n
            if isinstance(self.error, RequestEntityTooLarge):
                self.error = _JsonError(413, f"request body larger than {MAX_BUNDLE_BYTES} bytes (the bundle limit)")
            elif self.error is None and self.body_rcv is not None and gate is not None:
                refused = gate(str(self.headers.get("AUTHORIZATION", "")))
                if refused is not None:
                    self.error, self.completed, self.expect_continue = _JsonError(*refused), True, False
            return n

    class GatedChannel(HTTPChannel):  # type: ignore[misc]
        parser_class = GatedParser

    return GatedChannel


class HttpServer:
    """waitress serving a WSGI app from a background thread, stoppable (waitress's own run() is not).

    Requests with a body are checked from their headers before the body is read (`_gated_channel`)."""

    def __init__(self, app: Flask, host: str, port: int, *, threads: int = 4) -> None:
        try:
            # waitress refuses Content-Length >= max_request_body_size: > MAX_BUNDLE_BYTES, as Flask's own limit
            self._server: Any = create_server(app, host=host, port=port, threads=threads, ident="cloud-gateway",
                                              max_request_body_size=MAX_BUNDLE_BYTES + 1,
                                              clear_untrusted_proxy_headers=True)
        except OSError as e:  # one line naming the port and the flag, not waitress's traceback
            if e.errno == errno.EADDRNOTAVAIL:
                raise GatewayError(f"cannot listen on {host}: not an address of this machine (--http-host)") from e
            why = {errno.EADDRINUSE: "is already in use (another gateway?)",
                   errno.EACCES: "needs root to listen on"}.get(e.errno or 0, f"cannot be used ({e.strerror or e})")
            raise GatewayError(f"HTTP port {port} on {host} {why}: choose another with --http-port "
                               "(0: any free port; -1: no HTTP API)") from e
        self._server.channel_class = _gated_channel(app.extensions.get(BODY_GATE))
        self.port = int(self._server.effective_port)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="gateway-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        from waitress import wasyncore

        srv = self._server
        while not self._stop.is_set():
            wasyncore.loop(timeout=0.5, map=srv._map, use_poll=True, count=1)  # type: ignore[union-attr]
        for ch in list(srv._map.values()):  # type: ignore[union-attr]
            ch.close()
        srv.task_dispatcher.shutdown()  # type: ignore[union-attr]

    def stop(self) -> None:
        self._stop.set()
        if not self._thread.is_alive() and self._thread.ident is None:  # never started: close what was made
            self._server.close()  # type: ignore[union-attr]
            self._server.task_dispatcher.shutdown()  # type: ignore[union-attr]
            return
        try:
            self._server.pull_trigger()  # type: ignore[union-attr]  # wake the poll loop at once
        except OSError:
            pass  # the loop saw the stop flag first and already closed the trigger: nothing to wake
        self._thread.join(timeout=10)


class Gateway:
    def __init__(self, config: GatewayConfig, *, teacher: Teacher | None = None) -> None:
        self.config = config
        self.metrics = config.metrics
        self.teacher = teacher or load_teacher(config.teacher, threads=config.threads,
                                               prefer=config.teacher_format)
        self.store = GatewayStore(config.db)
        self.metrics.per_device = config.metrics_per_device
        for device_id, row in self.store.devices.versions().items():  # whose series go to which model line
            self.metrics.note_line(device_id, row["model_line"])
        self.collector = SampleCollector(self.store, config.collect, self.metrics, task=self.teacher.task)
        self.worker = GatewayWorker(config=config.worker, teacher=self.teacher, store=self.store,
                                    metrics=self.metrics, collector=self.collector)
        self._server: HttpServer | None = None
        self._started = False
        self.rollouts: RolloutManager | None = None
        self.policy: PolicyEngine | None = None
        self.leadership: Leadership | None = None
        self._lead_stop = threading.Event()
        self._lead_thread: threading.Thread | None = None
        self._command_key = load_private_key(config.command_key) if config.command_key is not None else None
        if not 0 < config.command_ttl_s <= MAX_TTL_S:
            raise GatewayError(f"command_ttl_s must be within 0..{MAX_TTL_S:g} s, got {config.command_ttl_s}")

    @property
    def http_url(self) -> str:
        assert self._server is not None, "HTTP API not started"
        return f"http://{self.config.http_host}:{self._server.port}"

    def send_command(self, device_id: str, cmd: dict[str, Any], *, ttl_s: float | None = None) -> Any:
        """Publish a command to a device: the one place commands leave the gateway, signed with its command key
        and valid ``ttl_s`` (default: ``command_ttl_s``, at least the rollout update timeout).

        Agents keep a session while away, so the broker would hold a command for an offline device until it
        returns; the MQTT message expires with the command (an update applied after its rollout gave up would
        run a version the rollout did not choose), and the device refuses it after that in any case."""
        ttl = ttl_s if ttl_s is not None else max(self.config.command_ttl_s, self.config.rollout_update_timeout_s)
        body = {k: v for k, v in cmd.items() if k != "schema"}
        if self._command_key is not None:
            payload = seal(body, device=device_id, key=self._command_key, ttl_s=ttl)
        else:
            payload = wire.dumps(body)
        return self.worker.link.publish(wire.Topics.of(self.config.worker.prefix, device_id, wire.Topics.CMD),
                                        payload, qos=1, expiry_s=max(1, int(math.ceil(ttl))))

    def start(self) -> "Gateway":
        if self._started:
            return self
        self.config.trust.warn_if_open("the gateway's bundle upload")
        if self.config.http_port is not None:
            self.rollouts = RolloutManager(
                store=self.store, bundles_dir=Path(self.config.bundles_dir).resolve(),
                send_command=self.send_command, base_url=lambda: self.http_url,
                update_timeout_s=self.config.rollout_update_timeout_s,
                evaluate=CandidateEvaluator(self.store, _teacher_run(Path(self.config.teacher))).evaluate)
            self.policy = PolicyEngine(store=self.store, gateway_url=lambda: self.http_url,
                                       start_rollout=self.rollouts.start, upload=self._store_bundle,
                                       interval_s=self.config.policy_interval_s)
            app = create_app(
                store=self.store, metrics=self.metrics, bundles_dir=self.config.bundles_dir,
                token=self.config.token, trust=self.config.trust,
                send_command=self.send_command, collect=self.config.collect,
                num_classes=len(self.teacher.labels), rollouts=self.rollouts, policy=self.policy,
                health=self._health,
            )
            # bound before the worker connects: a taken port is refused before anything else has started
            self._server = HttpServer(app, self.config.http_host, self.config.http_port)
        try:
            self.worker.start()
        except BaseException:
            if self._server is not None:
                self._server.stop()
                self._server = None
            raise
        self._started = True
        if self._server is not None and self.rollouts is not None and self.policy is not None:
            self._server.start()
            log.info("gateway HTTP API on %s", self.http_url)
            if self._command_key is None:
                log.warning("no command key (--command-key): commands to devices go UNSIGNED, and only devices "
                            "run with --allow-unsigned-commands (development) accept them")
            self.leadership = Leadership(self.store.db.engine)
            self.rollouts.is_leader = lambda: self.leadership is not None and self.leadership.leading
            self._lead_tick()  # a lone gateway leads at once
            self._lead_thread = threading.Thread(target=self._lead_loop, name="leader", daemon=True)
            self._lead_thread.start()
        return self

    def _lead_loop(self) -> None:
        while not self._lead_stop.wait(self.config.leader_poll_s):
            try:
                self._lead_tick()
            except Exception:  # the database away: asked again next poll
                log.exception("leader check failed")

    def _lead_tick(self) -> None:
        """Take the leader lock when free (then run the policy and resume every unfinished rollout); as the
        leader, check it is still held (else stop both) and adopt rollouts other replicas' APIs started."""
        lead, rollouts, policy = self.leadership, self.rollouts, self.policy
        if lead is None or rollouts is None or policy is None:
            return
        if lead.leading:
            if lead.held():
                adopted = rollouts.adopt()
                if adopted:
                    log.info("driving rollouts %s started through another replica", adopted)
                return
            log.error("no longer the leader: rollouts and the policy stop here (another replica takes them)")
            policy.stop()
            rollouts.stop()
            return
        if lead.try_acquire():
            log.info("replica %s leads: it drives rollouts and evaluates the policy", self.config.worker.replica_id)
            policy.start()
            resumed = rollouts.resume()  # a restart (or a dead leader) leaves unfinished rollouts where they were
            if resumed:
                log.warning("resumed rollouts %s", resumed)

    def _health(self) -> dict[str, object]:
        req, ingest = self.worker.connected.is_set(), self.worker.ingest_connected.is_set()
        return {"ok": req and ingest, "mqtt_connected": req, "ingest_connected": ingest,
                "replica": self.config.worker.replica_id, "leader": self.is_leader, "teacher": self.teacher.version,
                "teacher_labels": self.teacher.labels_source}

    def _store_bundle(self, name: str, tar: Path) -> None:
        """Verify (signed by a trusted key) and store a bundle as the upload endpoint does."""
        import shutil
        import tempfile

        bundles = Path(self.config.bundles_dir).resolve()
        with tempfile.TemporaryDirectory(dir=bundles) as tmp:
            self.config.trust.open(tar, extract_to=Path(tmp) / "x")
            shutil.copyfile(tar, Path(tmp) / "b.tar.gz")
            (Path(tmp) / "b.tar.gz").replace(bundles / f"{name}.tar.gz")

    @property
    def is_leader(self) -> bool:
        return self.leadership is not None and self.leadership.leading

    def stop(self) -> None:
        self._lead_stop.set()
        if self._lead_thread is not None:
            self._lead_thread.join(5)
        if self.policy is not None:
            self.policy.stop()
        if self.rollouts is not None:
            self.rollouts.stop()
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self.leadership is not None:
            self.leadership.release()
        self.worker.stop()

    def __enter__(self) -> "Gateway":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _teacher_run(teacher: Path) -> Path | None:
    """The toolchain run the gateway's teacher comes from (its test split is evaluation evidence), if any."""
    run = teacher if teacher.is_dir() else teacher.parent
    return run if (run / "data.json").is_file() and (run / "config.toml").is_file() else None
