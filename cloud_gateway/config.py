"""The gateway's settings: one home for every default, read by the dataclasses and the CLI alike.

Light on purpose (no numpy, Flask or SQLAlchemy): ``cloud-gateway --help`` builds its flags from these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecore import wire
from edgecore.bundle import TrustPolicy
from edgecore.errors import GatewayError
from edgecore.mqtt import DEFAULT_VERSION

from .metrics import Metrics

# the promotion condition when a rollout names none: the API's and the command line's alike
DEFAULT_PROMOTE_IF = "rollbacks == 0 and offload_rate <= baseline * 1.25"


@dataclass
class WorkerConfig:
    broker_url: str
    username: str | None = None
    password: str | None = None
    prefix: str = wire.DEFAULT_PREFIX
    group: str = wire.SHARE_GROUP
    replica_id: str = "gw-0"
    batch_size: int = 32
    batch_ms: float = 5.0
    max_payload_bytes: int = 1 << 20
    # requests one device may have waiting for the teacher (a tenth of the queue): past it, its own are refused,
    # so one device's flood never fills the queue that every device's requests wait in
    max_pending_per_device: int = 1000
    # telemetry windows one device may have stored per second (a bucket of ``telemetry_burst``); past it a window
    # is neither stored nor acknowledged, and its agent sends it again later
    telemetry_per_s: float = 20.0
    telemetry_burst: int = 500
    # statuses one device may have stored per second (a bucket of ``status_burst``); past it the latest one waits
    # for the next token (a flood is coalesced: the last status always lands)
    status_per_s: float = 2.0
    status_burst: int = 20
    # ingest (cloud_gateway/ingest.py): with a group, telemetry and status are subscribed as
    # ``$share/<ingest_group>/...`` and replicas split them; "" (the default): every replica receives everything and
    # the store dedupes (Mosquitto 2.0 loses a shared subscription's message published while the session is
    # away across a broker restart: docs/gateway.md "Fleet scale"); MQTT 3.1.1: never shared
    ingest_group: str = ""
    ingest_queue: int = 20_000  # windows waiting for the ingest thread; past it the MQTT thread waits (back-pressure)
    ingest_batch: int = 1000  # at most this many windows per transaction
    ingest_block_s: float = 1.0  # how long the MQTT thread waits for room before a window is refused (resent)
    status_snapshot_s: float = 3.0  # a shared subscription gets no retained statuses: read them this long at connect
    telemetry_retention_days: float = 30.0  # raw windows whose t_end is older are deleted (0: kept forever)
    retention_sweep_s: float = 300.0  # how often the retention is applied
    session_expiry_s: int = 3600  # the ingest (telemetry, status) session, kept while the replica is away
    request_session_expiry_s: int = 0  # the request session: 0 = clean, gone with the connection (see docs)
    keepalive_s: int = 10
    mqtt_version: str = DEFAULT_VERSION  # "3.1.1": no shared subscription (one replica), requests carry an envelope


@dataclass(frozen=True)
class CollectionPolicy:
    devices: frozenset[str] = frozenset()  # empty: off
    all_devices: bool = False
    rate: float = 1.0  # share of a named device's offloads collected (flagged ones always are)
    max_per_device: int = 10_000
    max_total: int = 100_000
    retention_days: float = 30.0  # 0: keep until the bounds push them out

    @classmethod
    def parse(cls, spec: str | None, **kw: Any) -> "CollectionPolicy":
        """``--collect``: None/"" (off), ``all``, or ``dev-1,dev-2``; bounds and rate checked here."""
        names = frozenset(d.strip() for d in (spec or "").split(",") if d.strip())
        policy = cls(devices=names - {"all"}, all_devices="all" in names, **kw)
        if not 0.0 <= policy.rate <= 1.0:
            raise GatewayError(f"--collect-rate must be within 0..1, got {policy.rate}")
        if policy.max_per_device < 1 or policy.max_total < 1:
            raise GatewayError("--collect-max-per-device and --collect-max-total must be >= 1")
        if policy.retention_days < 0:
            raise GatewayError(f"--collect-retention-days must be >= 0, got {policy.retention_days}")
        return policy

    @property
    def enabled(self) -> bool:
        return self.all_devices or bool(self.devices)

    def covers(self, device_id: str) -> bool:
        return self.all_devices or device_id in self.devices

    def to_dict(self) -> dict[str, Any]:
        return {"devices": "all" if self.all_devices else sorted(self.devices), "rate": self.rate,
                "max_per_device": self.max_per_device, "max_total": self.max_total,
                "retention_days": self.retention_days}


@dataclass
class GatewayConfig:
    worker: WorkerConfig
    teacher: Path
    db: str = "gateway.sqlite"
    bundles_dir: Path = Path("gateway-bundles")  # resolved against the working directory at start-up
    http_host: str = "127.0.0.1"
    http_port: int | None = 8080  # None: no HTTP API (a pure worker replica); 0: any free port
    token: str | None = None
    threads: int | None = None
    teacher_format: str = "onnx"  # which one a run dir's teacher is loaded from: onnx | torch
    metrics: Metrics = field(default_factory=Metrics)
    metrics_per_device: bool = False  # /metrics: a series per device (default: summed per model line)
    trust: TrustPolicy = field(default_factory=TrustPolicy)  # whose signatures an uploaded bundle needs
    collect: CollectionPolicy = field(default_factory=CollectionPolicy)  # sample collection (off by default)
    rollout_update_timeout_s: float = 60.0  # how long a rollout waits for devices to apply an update
    policy_interval_s: float = 30.0  # how often the refresh policy is evaluated (cloud_gateway/policy.py)
    # the gateway's command key (Ed25519 .key): every command to a device is signed with it and expires
    # (`edgecore.commands`); devices trust its .pub (--command-key). None: commands go unsigned, and only devices
    # run with --allow-unsigned-commands (development) accept them
    command_key: Path | None = None
    # how often a replica tries for the leader lock (`cloud_gateway.leader`: only the leader drives rollouts and
    # the policy), and the leader checks it still holds it and adopts rollouts other replicas' APIs started
    leader_poll_s: float = 2.0
    command_ttl_s: float = 300.0  # a command's lifetime; bench jobs and rollouts use theirs when longer
