"""Fleet benchmarks: send one bench job to each device over MQTT, collect the answers.

The operator publishes the job on ``<prefix>/<id>/cmd`` (QoS 1) after its
subscriptions to ``<prefix>/<id>/bench`` are acknowledged, so no answer can be
missed; answers are matched by ``job_id``. A device that does not answer by
the deadline is reported as such, next to the ones that did. The agents run
`hw_bench.job.run_job` on their own hardware with their own runtime.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from edgecore.errors import BenchError, BrokerError
from edgecore.mqtt import DEFAULT_VERSION, MqttLink
from edgecore.wire import DEFAULT_PREFIX, Topics

from .envinfo import environment
from .loadgen import Scenario, Settings
from .results import new_run

JOB_SCHEMA = 1


@dataclass(frozen=True)
class FleetJob:
    scenario: Scenario = Settings.scenario  # the local run's settings: one default for each
    duration_s: float = Settings.min_duration_s
    min_queries: int = Settings.min_queries
    warmup: int = Settings.warmup
    threads: int | None = None
    accuracy: bool = True
    data: str | None = None  # .npz path or URL the devices can read

    def message(self, *, job_id: str, bundle: str | None, sha256: str | None = None) -> dict[str, Any]:
        """The job as the devices get it. ``bundle``: an http(s) URL the devices fetch (under their update
        bases), a manifest sha256, or a bundle folder or tarball here, sent as its manifest sha256 (a device
        benchmarks it if it holds it: the one it runs, the previous one or one it fetched). Devices read no
        paths, so ``data`` must be a URL too."""
        is_url = bool(bundle) and str(bundle).startswith(("http://", "https://"))
        if self.data and not self.data.startswith(("http://", "https://")):
            raise BenchError(f"--data {self.data}: devices read test data only from an http(s) URL on their update "
                             "allow-list (--update-base); serve the .npz there")
        msg: dict[str, Any] = {
            "schema": JOB_SCHEMA, "cmd": "bench", "job_id": job_id,
            "bundle_url": bundle if is_url else None,
            "scenario": self.scenario.value, "duration_s": self.duration_s, "min_queries": self.min_queries,
            "warmup": self.warmup, "threads": self.threads, "accuracy": self.accuracy,
        }
        if bundle and not is_url:
            msg["bundle_sha256"] = bundle_id(bundle)
        if sha256:
            msg["sha256"] = sha256
        if self.data:
            msg["data"] = self.data
        return msg


def bundle_id(bundle: str) -> str:
    """A bundle's manifest sha256: ``bundle`` is one already, or a bundle folder or tarball on this machine."""
    if re.fullmatch(r"[0-9a-f]{64}", bundle):
        return bundle
    from edgecore.bundle import open_bundle

    with open_bundle(bundle) as b:
        return b.manifest_sha256


class _FleetClient:
    """The devices' answers to one fleet job, as they arrive on the link's network thread."""

    def __init__(self, *, job_id: str, devices: list[str], progress: Callable[[str], None] | None) -> None:
        self.job_id, self.devices, self.progress = job_id, devices, progress
        self.answers: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.done = threading.Event()

    def on_message(self, msg: Any) -> None:
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


def _payload(msg: dict[str, Any], device: str, key: Any, ttl_s: int) -> bytes:
    if key is None:
        return json.dumps(msg).encode()
    from edgecore.commands import MAX_TTL_S, seal

    return seal(msg, device=device, key=key, ttl_s=min(float(ttl_s), MAX_TTL_S))


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
    prefix: str = DEFAULT_PREFIX,
    sha256: str | None = None,
    connect_timeout_s: float = 10.0,
    progress: Callable[[str], None] | None = None,
    mqtt_version: str = DEFAULT_VERSION,
    command_key: Any = None,
) -> dict[str, Any]:
    """Dispatch ``job`` to ``devices`` and collect one run dict (``devices`` + flattened ``results``).

    ``command_key``: the Ed25519 private key devices trust for commands (the gateway's command key): the job is
    signed for each device and expires with the deadline (`edgecore.commands`). None: sent unsigned, which only
    devices run with ``--allow-unsigned-commands`` accept.

    The job goes out once the broker acknowledged the subscriptions to the devices' answers: none is missed.
    """
    _check_devices(devices)
    job_id = uuid.uuid4().hex
    msg = job.message(job_id=job_id, bundle=bundle, sha256=sha256)  # a bad bundle or data: before connecting
    fc = _FleetClient(job_id=job_id, devices=devices, progress=progress)
    try:
        link = MqttLink(url=broker, client_id=f"hw-bench-{job_id[:8]}", username=username, password=password,
                        keepalive=30, mqtt_version=mqtt_version, anonymous_hint="give --username and --password")
        for d in devices:
            link.subscribe(Topics.of(prefix, d, Topics.BENCH), fc.on_message)
        link.start(wait=connect_timeout_s)  # returns once the subscriptions are acknowledged
    except BrokerError as e:
        raise BenchError(str(e)) from e
    try:
        # a device that is away gets the job only while the answers are still awaited
        ttl = max(1, int(deadline_s))
        infos = [link.publish(Topics.of(prefix, d, Topics.CMD), _payload(msg, d, command_key, ttl), qos=1,
                              expiry_s=ttl) for d in devices]
        for i in infos:
            i.wait_for_publish(timeout=connect_timeout_s)
        if progress:
            progress(f"job {job_id} sent to {len(devices)} device(s); waiting up to {deadline_s:g} s")
        started = time.monotonic()
        fc.done.wait(deadline_s)
        waited = time.monotonic() - started
    finally:
        link.stop()
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
