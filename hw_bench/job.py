"""A fleet bench job, run by the device agent on its own hardware (torch-free).

The agent receives ``{"schema": 1, "cmd": "bench", ...}`` on ``fleet/<id>/cmd``,
resolves the bundle, and calls `run_job` in a worker thread; it publishes the
returned dict as ``result`` on ``fleet/<id>/bench``. The result has the same
shape as a local run file (``schema_version``, ``env``, ``results``), so the
fleet report reads both alike.

Job keys (contract): ``job_id``, ``scenario`` ("single-stream"|"offline"),
``duration_s``, ``min_queries``, ``warmup``, ``threads`` (null = runtime
default), ``accuracy`` (bool). Optional: ``data`` (path or http(s) URL of an
.npz with ``X_raw``/``y``) for accuracy mode, ``batch_sizes`` for offline.
"""

from __future__ import annotations

from typing import Any

from edgecore.bundle import Bundle, open_bundle
from edgecore.errors import BenchError

from . import RESULTS_SCHEMA_VERSION
from .bench import bundle_contender, measure
from .data import load_npz
from .envinfo import environment
from .loadgen import Scenario, Settings

JOB_SCHEMA = 1
#: a job may not keep a device busy longer than this
MAX_JOB_DURATION_S = 300.0


def _num(job: dict[str, Any], key: str, default: float, kind: type) -> Any:
    v = job.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BenchError(f"bench job: {key!r} must be a number, got {v!r}")
    return kind(v)


def settings_from_job(job: dict[str, Any]) -> Settings:
    """The job's settings, validated; bad values name the field."""
    if not isinstance(job, dict):
        raise BenchError(f"bench job must be a JSON object, got {type(job).__name__}")
    if job.get("schema", JOB_SCHEMA) != JOB_SCHEMA:
        raise BenchError(f"bench job: unknown schema {job.get('schema')!r} (this device reads {JOB_SCHEMA})")
    try:
        scenario = Scenario(job.get("scenario") or "single-stream")
    except ValueError as e:
        raise BenchError(
            f"bench job: unknown scenario {job.get('scenario')!r}; choose from "
            f"{', '.join(s.value for s in Scenario)}"
        ) from e
    duration = _num(job, "duration_s", 2.0, float)
    if duration > MAX_JOB_DURATION_S:
        raise BenchError(f"bench job: duration_s {duration} exceeds the device limit of {MAX_JOB_DURATION_S} s")
    kw: dict[str, Any] = dict(
        scenario=scenario,
        min_duration_s=duration,
        min_queries=_num(job, "min_queries", 100, int),
        warmup=_num(job, "warmup", 10, int),
        max_duration_s=MAX_JOB_DURATION_S,
    )
    if job.get("batch_sizes") is not None:
        bs = job["batch_sizes"]
        if not isinstance(bs, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in bs):
            raise BenchError(f"bench job: batch_sizes must be a list of integers, got {bs!r}")
        kw["batch_sizes"] = tuple(bs)
    return Settings(**kw)


def threads_from_job(job: dict[str, Any]) -> int | None:
    t = job.get("threads")
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise BenchError(f"bench job: threads must be a positive integer or null, got {t!r}")
    return t


def run_job(job: dict[str, Any], bundle: Bundle) -> dict[str, Any]:
    """Benchmark ``bundle`` on this device as ``job`` asks; returns the result dict.

    Raises `BenchError` (bad job, unusable data) or the bundle's own errors
    (`TargetUnavailableError` when this device lacks the runtime); the agent
    turns any exception into ``{"ok": false, "error": ...}``.
    """
    settings = settings_from_job(job)
    threads = threads_from_job(job)
    want_accuracy = bool(job.get("accuracy", True))
    data = None
    notes: list[str] = []
    if want_accuracy:
        if job.get("data"):
            data = load_npz(str(job["data"]))
        else:
            notes.append("accuracy skipped: the job carries no test data (bundles hold none)")
    contender = bundle_contender(bundle, threads=threads)
    rows = measure([contender], settings=settings, repetitions=1, data=data, do_accuracy=want_accuracy)
    for row in rows:
        row.pop("speedup_vs_pytorch", None)
        row["job_id"] = job.get("job_id")
    return {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "kind": "hw_bench.results",
        "job_id": job.get("job_id"),
        "env": environment(threads=threads),
        "results": rows,
        "notes": notes,
    }


def agent_command(agent: Any, cmd: dict[str, Any]) -> None:
    """The device agent's ``bench`` command (entry point ``edge_toolchain.agent_commands``).

    Resolves the job's bundle (``bundle_url`` under the agent's update bases,
    ``bundle_path`` on the device, or the one it runs), runs `run_job` and
    publishes ``{job_id, device_id, ok, result|error}`` on ``<prefix>/<id>/bench``;
    raises on failure so the agent's status says so too.
    """
    reply: dict[str, Any] = {"job_id": cmd.get("job_id"), "device_id": agent.config.device_id}
    try:
        if cmd.get("bundle_url"):
            bundle = agent.fetch(str(cmd["bundle_url"]), sha256=cmd.get("sha256"))
        elif cmd.get("bundle_path"):
            bundle = open_bundle(str(cmd["bundle_path"]))
        else:
            bundle = agent.bundle
        reply.update(ok=True, result=run_job(cmd, bundle))
    except Exception as e:  # the operator must get an answer, whatever failed
        reply.update(ok=False, error=f"{type(e).__name__}: {e}")
    agent.fleet.publish(agent.topics.bench, reply)
    if not reply["ok"]:
        raise BenchError(reply["error"])
