"""One gateway replica: MQTT worker + telemetry store + HTTP API in one process."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from werkzeug.serving import make_server

from .api import create_app
from .metrics import Metrics
from .model import Teacher, load_teacher
from .store import TelemetryStore
from .worker import GatewayWorker, WorkerConfig

log = logging.getLogger(__name__)


@dataclass
class GatewayConfig:
    worker: WorkerConfig
    teacher: Path
    db: str = "gateway.sqlite"
    bundles_dir: Path = Path("gateway-bundles")
    http_host: str = "127.0.0.1"
    http_port: int | None = 8080  # None: no HTTP API (a pure worker replica); 0: any free port
    token: str | None = None
    threads: int | None = None
    teacher_format: str = "onnx"  # which one a run dir's teacher is loaded from: onnx | torch
    metrics: Metrics = field(default_factory=Metrics)


class Gateway:
    def __init__(self, config: GatewayConfig, *, teacher: Teacher | None = None) -> None:
        self.config = config
        self.metrics = config.metrics
        self.teacher = teacher or load_teacher(config.teacher, threads=config.threads,
                                               prefer=config.teacher_format)
        self.store = TelemetryStore(config.db)
        self.worker = GatewayWorker(config=config.worker, teacher=self.teacher, store=self.store,
                                    metrics=self.metrics)
        self._server = None
        self._thread: threading.Thread | None = None
        self._started = False

    @property
    def http_url(self) -> str:
        assert self._server is not None, "HTTP API not started"
        return f"http://{self.config.http_host}:{self._server.server_port}"

    def start(self) -> "Gateway":
        if self._started:
            return self
        self._started = True
        self.worker.start()
        if self.config.http_port is not None:
            app = create_app(
                store=self.store, metrics=self.metrics, bundles_dir=self.config.bundles_dir,
                token=self.config.token, prefix=self.config.worker.prefix,
                publish=lambda t, p: self.worker.client.publish(t, p, qos=1),
                health=lambda: {"ok": self.worker.connected.is_set(), "mqtt_connected": self.worker.connected.is_set(),
                                "replica": self.config.worker.replica_id, "teacher": self.teacher.version},
            )
            self._server = make_server(self.config.http_host, self.config.http_port, app, threaded=True)
            self._thread = threading.Thread(target=self._server.serve_forever, name="gateway-http", daemon=True)
            self._thread.start()
            log.info("gateway HTTP API on %s", self.http_url)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.worker.stop()

    def __enter__(self) -> "Gateway":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
