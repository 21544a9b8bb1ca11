"""Fleet benchmarks: send one bench job to each device over MQTT, collect the answers.

The operator publishes the job on ``<prefix>/<id>/cmd`` (QoS 1) after its
subscriptions to ``<prefix>/<id>/bench`` are acknowledged, so no answer can be
missed; answers are matched by ``job_id``. A device that does not answer by
the deadline is reported as such, next to the ones that did. The agents run
`hw_bench.job.run_job` on their own hardware with their own runtime.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from edgecore.errors import BenchError
from edgecore.wire import Topics

from .envinfo import environment
from .loadgen import Scenario
from .results import new_run

JOB_SCHEMA = 1


@dataclass(frozen=True)
class FleetJob:
    scenario: Scenario = Scenario.SINGLE_STREAM
    duration_s: float = 2.0
    min_queries: int = 100
    warmup: int = 10
    threads: int | None = None
    accuracy: bool = True
    data: str | None = None  # .npz path or URL the devices can read

    def message(self, *, job_id: str, bundle: str | None, sha256: str | None = None) -> dict[str, Any]:
        is_url = bool(bundle) and str(bundle).startswith(("http://", "https://"))
        msg: dict[str, Any] = {
            "schema": JOB_SCHEMA, "cmd": "bench", "job_id": job_id,
            "bundle_url": bundle if is_url else None,
            "bundle_path": bundle if bundle and not is_url else None,
            "scenario": self.scenario.value, "duration_s": self.duration_s, "min_queries": self.min_queries,
            "warmup": self.warmup, "threads": self.threads, "accuracy": self.accuracy,
        }
        if sha256:
            msg["sha256"] = sha256
        if self.data:
            msg["data"] = self.data
        return msg


def _broker(url: str) -> Any:
    from device_agent.transport import BrokerAddress
    from edgecore.errors import AgentError

    try:
        return BrokerAddress.parse(url)
    except AgentError as e:
        raise BenchError(str(e)) from e


class _FleetClient:
    """The paho callbacks of one fleet job: connection, subscription acks, and the devices' answers."""

    def __init__(self, *, job_id: str, devices: list[str], progress: Callable[[str], None] | None) -> None:
        self.job_id, self.devices, self.progress = job_id, devices, progress
        self.answers: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.connected = threading.Event()
        self.connect_rc: list[Any] = []
        self.suback = threading.Event()
        self.pending_sub: set[int] = set()

    def on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.connect_rc.append(rc)
        self.connected.set()

    def on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any = None) -> None:
        with self.lock:
            self.pending_sub.discard(mid)
            if not self.pending_sub:
                self.suback.set()

    def on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        dev = parts[-2] if len(parts) >= 2 else ""
        try:
            body = json.loads(msg.payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return
        if not isinstance(body, dict) or body.get("job_id") != self.job_id or dev not in self.devices:
            return  # an older job's answer, or noise
        with self.lock:
            if dev in self.answers:
                return
            self.answers[dev] = body
            if self.progress:
                self.progress(f"{dev}: {'ok' if body.get('ok') else 'error: ' + str(body.get('error'))}")
            if len(self.answers) == len(self.devices):
                self.done.set()

    def attach(self, client: Any) -> None:
        client.on_connect, client.on_subscribe, client.on_message = self.on_connect, self.on_subscribe, self.on_message

    def check_connected(self, broker: str, timeout_s: float) -> None:
        if not self.connected.wait(timeout_s):
            raise BenchError(f"broker {broker} did not answer the connection within {timeout_s} s")
        rc = self.connect_rc[0]
        if getattr(rc, "is_failure", False) or (isinstance(rc, int) and rc != 0):
            raise BenchError(f"broker {broker} refused the connection: {rc} (check --username/--password)")

    def subscribe(self, client: Any, broker: str, prefix: str, timeout_s: float) -> None:
        with self.lock:
            for d in self.devices:
                r, mid = client.subscribe(Topics.of(prefix, d, Topics.BENCH), qos=1)
                self.pending_sub.add(mid)
        if not self.suback.wait(timeout_s):
            raise BenchError(f"broker {broker} did not acknowledge the subscriptions")


def _check_devices(devices: list[str]) -> None:
    if not devices:
        raise BenchError("no devices given")
    if len(set(devices)) != len(devices):
        raise BenchError(f"a device is listed twice: {devices}")
    for d in devices:
        if not d or any(c in d for c in "/+#"):
            raise BenchError(f"bad device id {d!r}")


def run_fleet(
    *,
    broker: str,
    devices: list[str],
    bundle: str | None,
    job: FleetJob,
    username: str | None = None,
    password: str | None = None,
    deadline_s: float = 120.0,
    prefix: str = "fleet",
    sha256: str | None = None,
    connect_timeout_s: float = 10.0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Dispatch ``job`` to ``devices`` and collect one run dict (``devices`` + flattened ``results``)."""
    import paho.mqtt.client as mqtt

    _check_devices(devices)
    addr = _broker(broker)
    host, port = addr.host, addr.port
    job_id = uuid.uuid4().hex
    fc = _FleetClient(job_id=job_id, devices=devices, progress=progress)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"hw-bench-{job_id[:8]}")
    if username:
        client.username_pw_set(username, password)
    addr.configure(client)
    fc.attach(client)
    try:
        client.connect(host, port, keepalive=30)
    except OSError as e:
        raise BenchError(f"cannot reach broker {broker}: {e}") from e
    client.loop_start()
    try:
        fc.check_connected(broker, connect_timeout_s)
        fc.subscribe(client, broker, prefix, connect_timeout_s)
        msg = job.message(job_id=job_id, bundle=bundle, sha256=sha256)
        infos = [client.publish(Topics.of(prefix, d, Topics.CMD), json.dumps(msg), qos=1) for d in devices]
        for i in infos:
            i.wait_for_publish(timeout=connect_timeout_s)
        if progress:
            progress(f"job {job_id} sent to {len(devices)} device(s); waiting up to {deadline_s:g} s")
        started = time.monotonic()
        fc.done.wait(deadline_s)
        waited = time.monotonic() - started
    finally:
        client.loop_stop()
        client.disconnect()
    return collect(devices=devices, answers=fc.answers, job=msg, deadline_s=deadline_s, waited_s=waited)


def collect(*, devices: list[str], answers: dict[str, dict[str, Any]], job: dict[str, Any], deadline_s: float,
            waited_s: float) -> dict[str, Any]:
    """One run dict from the devices' answers; missing devices marked ``timeout``."""
    device_rows: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for d in devices:
        a = answers.get(d)
        if a is None:
            device_rows.append({"device_id": d, "ok": False, "status": "timeout",
                                "error": f"no answer within the {deadline_s:g} s deadline"})
            continue
        if not a.get("ok"):
            device_rows.append({"device_id": d, "ok": False, "status": "error", "error": str(a.get("error"))})
            continue
        result = a.get("result") or {}
        env = result.get("env", {})
        device_rows.append({"device_id": d, "ok": True, "status": "ok", "env": env, "notes": result.get("notes", [])})
        for r in result.get("results", []):
            rows.append({**r, "device_id": d, "env": env})
    run = new_run(env=environment(), rows=rows,
                  notes=[f"fleet job {job['job_id']}: {sum(1 for x in device_rows if x['ok'])}/{len(devices)} devices answered "
                         f"in {waited_s:.1f} s"])
    run["job"] = job
    run["devices"] = device_rows
    return run
