"""Latency of a candidate artifact measured on a fleet device (``prune.latency_device = DEVICE_ID``).

Registered for the toolchain's latency-budget search through the entry-point
group ``edge_toolchain.latency_devices`` (the toolchain never imports hw-bench).
The artifact becomes a bundle (the one writer, signed with
``prune.latency_sign_key``: devices refuse unsigned bundles), is uploaded to the
gateway (``prune.latency_gateway``; the device fetches it from there, so its
agent needs ``--update-base GATEWAY``) or, without a gateway, put in a shared
mount the device's agent takes bench bundles from (``--bench-dir``) and named
by its manifest sha256, and the device's agent runs its
``bench`` command on it: the single-stream scenario on its own runtime, answered
over MQTT (`hw_bench.fleet.run_fleet`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from edgecore.clikit import TOKEN_ENV, gateway_token
from edgecore.errors import BenchError


def _credentials(path: str) -> tuple[str | None, str | None]:
    if not path:
        return None, None
    try:
        data = json.loads(Path(path).read_text())
        entry = data.get("operator") or data.get("admin") or data
        return str(entry["username"]), str(entry["password"])
    except (OSError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise BenchError(f"prune.latency_credentials {path}: no username/password in it ({e})") from e


def _upload(gateway: str, tar: Path, name: str) -> str:
    token = gateway_token()
    if not token:
        raise BenchError(f"uploading candidates to {gateway} needs the gateway's write token in ${TOKEN_ENV}")
    req = urllib.request.Request(f"{gateway.rstrip('/')}/api/bundles/{name}", data=tar.read_bytes(), method="PUT",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/gzip"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return str(json.loads(r.read())["url"])
    except urllib.error.HTTPError as e:
        raise BenchError(f"gateway {gateway} refused the candidate bundle: {e.code} {e.read()[:300]!r}") from e
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        raise BenchError(f"cannot upload the candidate bundle to {gateway}: {e}") from e


def measure(*, device: str, artifact_dir: Path, artifact: Any, source: Any, calibration: Any, threads: int,
            min_queries: int, min_seconds: float, warmup: int, options: dict[str, Any]) -> np.ndarray:
    """Per-query latencies (ms) of ``artifact_dir`` measured on ``device``; BenchError names what failed."""
    from edgecore.bundle import write_tarball
    from edgecore.signing import load_private_key
    from hw_bench.fleet import FleetJob, run_fleet
    from hw_bench.loadgen import Scenario
    from hw_bench.models import _write_bundle

    if not options.get("broker"):
        raise BenchError(f"measuring on fleet device {device!r} needs prune.latency_broker (the fleet's MQTT broker)")
    key = load_private_key(options["sign_key"]) if options.get("sign_key") else None
    # devices run only commands signed by a command key they trust (edgecore.commands)
    command_key = load_private_key(options["command_key"]) if options.get("command_key") else None
    share = Path(options["share_dir"]) if options.get("share_dir") else None
    root = Path(tempfile.mkdtemp(prefix="latency-bundle-", dir=share))
    try:
        bundle = root / source.name
        shutil.copytree(artifact_dir, bundle)
        _write_bundle(bundle, artifact=artifact, source=source, calibration=calibration, metrics={}, signing_key=key)
        tar = write_tarball(bundle)
        # without a gateway the candidate is named by its manifest sha256: the device takes it from the shared
        # mount only if its agent was given that folder with --bench-dir (it reads no other path)
        where = _upload(options["gateway"], tar, f"latency-{source.name}") if options.get("gateway") else str(bundle)
        user, pw = _credentials(options.get("credentials", ""))
        job = FleetJob(scenario=Scenario.SINGLE_STREAM, duration_s=min_seconds, min_queries=min_queries,
                       warmup=warmup, threads=threads, accuracy=False)
        run = run_fleet(broker=options["broker"], devices=[device], bundle=where, job=job, username=user, password=pw,
                        deadline_s=float(options.get("deadline_s", 120.0)), prefix=options.get("prefix", "fleet"),
                        command_key=command_key)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    status = run["devices"][0]
    if not status["ok"]:
        raise BenchError(f"fleet device {device!r} did not measure the candidate: {status.get('error')}")
    lat = run["results"][0].get("latencies_ms") or []
    if not lat:
        raise BenchError(f"fleet device {device!r} answered without latencies")
    return np.asarray(lat, dtype=np.float64)
