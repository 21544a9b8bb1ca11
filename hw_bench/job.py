"""A fleet bench job, run by the device agent on its own hardware (torch-free).

The agent receives ``{"schema": 1, "cmd": "bench", ...}`` on ``fleet/<id>/cmd``,
resolves the bundle, and calls `run_job` in a worker thread; it publishes the
returned dict as ``result`` on ``fleet/<id>/bench``. The result has the same
shape as a local run file (``schema_version``, ``env``, ``results``), so the
fleet report reads both alike.

Job keys (contract): ``job_id``, ``scenario`` ("single-stream"|"offline"),
``duration_s``, ``min_queries``, ``warmup``, ``threads`` (null = runtime
default), ``accuracy`` (bool). Optional: ``bundle_url`` (under the device's
update bases) or ``bundle_sha256`` (a bundle the device holds; neither: the one
it runs), ``sha256`` (the tarball's or manifest's, checked), ``data`` (an
http(s) URL on the update allow-list of an .npz with ``X_raw``/``y``) for
accuracy mode, ``batch_sizes`` for offline. A device benchmarks only what it
would run: the same trust as an update (docs/security.md).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from edgecore.bundle import Bundle
from edgecore.errors import BenchError, BundleTrustError, EdgeError

from . import RESULTS_SCHEMA_VERSION
from .bench import bundle_contender, measure
from .data import TestData, load_npz
from .envinfo import environment
from .loadgen import Scenario, Settings

log = logging.getLogger(__name__)

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


def run_job(job: dict[str, Any], bundle: Bundle, *, data: TestData | None = None) -> dict[str, Any]:
    """Benchmark ``bundle`` on this machine as ``job`` asks; returns the result dict.

    ``data``: the test data for accuracy mode; without it, the job's ``data`` (a path or URL) is read here,
    which is for an operator's own machine: the agent's command (`agent_command`) resolves the job's data
    itself, under the device's trust, and passes it.

    Raises `BenchError` (bad job, unusable data) or the bundle's own errors
    (`TargetUnavailableError` when this device lacks the runtime); the agent
    turns any exception into ``{"ok": false, "error": ...}``.
    """
    settings = settings_from_job(job)
    threads = threads_from_job(job)
    want_accuracy = bool(job.get("accuracy", True))
    notes: list[str] = []
    if want_accuracy and data is None:
        if job.get("data"):
            data = load_npz(str(job["data"]))
        else:
            notes.append("accuracy skipped: the job carries no test data (bundles hold none)")
    contender = bundle_contender(bundle, threads=threads)
    rows = measure([contender], settings=settings, repetitions=1, data=data if want_accuracy else None,
                   do_accuracy=want_accuracy)
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


# --- the device agent's ``bench`` command: the same trust as an update ------------------------------------

#: test data a bench job may download (bytes on the wire, and each array decompressed), and how long it may take
MAX_JOB_DATA_BYTES = 64 << 20
JOB_DOWNLOAD_DEADLINE_S = 120.0
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _refused(why: str) -> BenchError:
    return BenchError(f"bench refused: {why}")


def _held_bundle(agent: Any, sha: str) -> Bundle:
    """The bundle with manifest sha256 ``sha`` that this device holds: the one it runs, the previous one, one
    fetched into its state dir, or one in a ``--bench-dir`` folder; opened again under the device's trust (every
    hash, the listing and the signature: the job loads its files from disk again)."""
    from device_agent.updates import BUNDLES
    from edgecore.bundle import sha256_file

    running = [m.bundle.root for m in (agent.model.current, agent.model.previous) if m is not None]
    fetched = Path(agent.config.state_dir) / BUNDLES / sha[:16]
    candidates = running + [fetched] + [d for base in getattr(agent.config, "bench_dirs", ())
                                        for d in _bundle_dirs(Path(base))]
    for root in candidates:
        manifest = root / "manifest.json"
        try:
            if not manifest.is_file() or manifest.is_symlink() or sha256_file(manifest) != sha:
                continue
        except OSError:
            continue
        try:
            b = agent.config.trust.open(root)  # every hash, the listing and a trusted signature, again
        except BundleTrustError as e:
            log.error("bench: held bundle %s refused: %s", root, e)
            raise _refused("the bundle is not one this device trusts (the reason is in the device's log)") from e
        if b.manifest_sha256 == sha:
            return b
    raise _refused(f"this device holds no bundle {sha[:16]}… (give a bundle_url on the update allow-list)")


def _bundle_dirs(base: Path, depth: int = 2) -> list[Path]:
    """Folders up to ``depth`` levels under a configured bench dir that hold a ``manifest.json``."""
    found: list[Path] = []
    try:
        subs = [p for p in base.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return found
    for p in subs:
        if (p / "manifest.json").is_file():
            found.append(p)
        elif depth > 1:
            found += _bundle_dirs(p, depth - 1)
    return found


def resolve_bundle(agent: Any, cmd: dict[str, Any]) -> tuple[Bundle, Callable[[], None]]:
    """The job's bundle under the device's update trust, and what to call when the job is done.

    ``bundle_url``: only under the device's update bases, fetched and verified like an update (hashes,
    listing, limits, a trusted signature; bounded in size and time), removed after the job unless it is the
    bundle the device runs. ``bundle_sha256``: a bundle the device holds (the one it runs, the previous one,
    one it fetched, or one in a folder its agent was given with ``--bench-dir``), verified again. Neither: the
    bundle it runs. A path on the device is refused, whether or not something is there (no file-existence
    oracle).
    """
    from device_agent.updates import url_allowed

    if cmd.get("bundle_path"):
        raise _refused("bundle_path is not accepted (name a bundle this device holds by bundle_sha256, or give a "
                       "bundle_url on the update allow-list)")
    url, sha = cmd.get("bundle_url"), cmd.get("bundle_sha256")
    if url:
        if not isinstance(url, str) or not url_allowed(url, agent.config.update_bases):
            raise _refused("bundle_url is not on the update allow-list")
        want = cmd.get("sha256")
        if want is not None and not isinstance(want, str):
            raise _refused("sha256 must be a string")
        bundle = agent.fetch(url, sha256=want)

        def drop() -> None:
            held = {m.bundle.root.resolve() for m in (agent.model.current, agent.model.previous) if m is not None}
            if bundle.root.resolve() not in held:
                shutil.rmtree(bundle.root, ignore_errors=True)

        return bundle, drop
    if sha:
        if not isinstance(sha, str) or not _SHA256.match(sha):
            raise _refused("bundle_sha256 must be 64 lowercase hex digits (a manifest's sha256)")
        return _held_bundle(agent, sha), lambda: None
    return _held_bundle(agent, agent.bundle.manifest_sha256), lambda: None


def resolve_data(agent: Any, cmd: dict[str, Any]) -> TestData | None:
    """The job's test data: only an http(s) URL on the device's update allow-list, bounded in size and time,
    through a temporary file in the state dir that is removed; never a path on the device."""
    src = cmd.get("data")
    if not src or not cmd.get("accuracy", True):
        return None
    if not isinstance(src, str) or not src.startswith(("http://", "https://")):
        raise _refused("test data must be a URL on the update allow-list (the device reads no paths)")
    from device_agent.updates import url_allowed

    if not url_allowed(src, agent.config.update_bases):
        raise _refused("data URL is not on the update allow-list")
    state = Path(agent.config.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    return load_npz(src, allowed=agent.config.update_bases, max_bytes=MAX_JOB_DATA_BYTES,
                    deadline_s=JOB_DOWNLOAD_DEADLINE_S, tmp_dir=state)


def agent_command(agent: Any, cmd: dict[str, Any]) -> None:
    """The device agent's ``bench`` command (entry point ``edge_toolchain.agent_commands``).

    Resolves the job's bundle and data under the device's update trust (`resolve_bundle`, `resolve_data`),
    runs `run_job` and publishes ``{job_id, device_id, ok, result|error}`` on ``<prefix>/<id>/bench``;
    raises on failure so the agent's status says so too. Errors say what failed, never what the device's
    disk or network look like (details go to the device's log).
    """
    reply: dict[str, Any] = {"job_id": cmd.get("job_id"), "device_id": agent.config.device_id}
    done: Callable[[], None] = lambda: None  # noqa: E731
    try:
        settings_from_job(cmd)  # a bad job is refused before anything is fetched
        bundle, done = resolve_bundle(agent, cmd)
        data = resolve_data(agent, cmd)
        reply.update(ok=True, result=run_job({k: v for k, v in cmd.items() if k != "data"}, bundle, data=data))
    except EdgeError as e:
        reply.update(ok=False, error=str(e))
    except Exception as e:  # the operator must get an answer, whatever failed; a runtime's text stays in the log
        log.exception("bench job %s failed", cmd.get("job_id"))
        reply.update(ok=False, error=f"bench failed ({type(e).__name__}; the details are in the device's log)")
    finally:
        done()
    agent.fleet.publish(agent.topics.bench, reply)
    if not reply["ok"]:
        raise BenchError(reply["error"])
