"""The demo's closed loop: drift -> teacher-labelled hard inputs -> refreshed student -> canary -> fleet.

After the fleet has run (the drifted device shows DRIFT and offloads a lot):

1. the drifted device sees more of its shifted stream (*field* inputs, disjoint
   from the stream it is evaluated on: the scenario's, `edge_demo.scenarios`); the
   gateway, told to collect from it, stores its offloaded inputs with the
   teacher's answers (docs/gateway.md, "Collected samples");
2. ``toolchain refresh`` pulls them over the gateway's API, re-distills the
   student into an expert beside the unchanged student (a gate picks per
   input), writes a new run and builds the device's bundle, gated;
3. a staged rollout sends it to the drifted device as the canary, watches its
   telemetry (it streams its drifted evaluation stream again: the "after" numbers)
   and promotes it;
4. a deliberately broken bundle (signed, hashes right, model file garbage) is
   rolled out too: the device's own smoke test refuses it, the rollout rolls
   back, no device is left on it.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecore.errors import EdgeError


@dataclass
class LoopContext:
    gateway: Any
    broker: Any
    creds: Any
    token: str
    public_key: Path
    signing_key: Any
    run_dir: Path
    bundles_dir: Path
    out: Path
    device: str
    bundle_name: str
    window_s: float
    rate_hz: float
    streams: Any  # `edge_demo.scenarios.Streams`: ``drifted`` is scored before and after, ``field`` collected
    task: Any  # the run's `toolchain.tasks.TrainTask`: the metric of the answers


def _call(ctx: LoopContext, method: str, path: str, body: bytes | dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(f"{ctx.gateway.http_url}{path}", data=data, method=method, headers={
        "Authorization": f"Bearer {ctx.token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise EdgeError(f"gateway {method} {path}: {e.code} {e.read()[:400].decode(errors='replace')}") from e


def _agent(ctx: LoopContext) -> Any:
    from device_agent.agent import Agent, AgentConfig
    from edgecore.bundle import TrustPolicy

    from .story import command_trust

    return Agent(ctx.bundles_dir / ctx.bundle_name, AgentConfig(
        device_id=ctx.device, broker_url=ctx.broker.url, username=ctx.device, password=ctx.creds.devices[ctx.device],
        deadline_s=1.0, telemetry_window_s=ctx.window_s, state_dir=ctx.out / "fleet" / "agents" / ctx.device,
        mqtt_version=ctx.broker.mqtt_version, trust=TrustPolicy.from_paths([ctx.public_key]),
        command_trust=command_trust(ctx.public_key), update_bases=(f"{ctx.gateway.http_url}/api/bundles",),
    )).start()


def _upload(ctx: LoopContext, name: str, tar: Path) -> None:
    _call(ctx, "PUT", f"/api/bundles/{name}", tar.read_bytes())


def _wait(ctx: LoopContext, rid: int, states: set[str], timeout: float = 120.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = _call(ctx, "GET", f"/api/rollouts/{rid}")
        if r["state"] in states:
            return r  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise EdgeError(f"rollout {rid} did not reach {sorted(states)} within {timeout:g} s")


def broken_copy(bundle: Path, dest: Path, signing_key: Any) -> Path:
    """A bundle whose model file is garbage but whose manifest lists it correctly, signed: only a smoke test can tell."""
    from edgecore.bundle import open_bundle, write_bundle, write_tarball

    shutil.rmtree(dest, ignore_errors=True)  # a rerun (--reuse) makes it again
    shutil.copytree(bundle, dest)
    m = open_bundle(dest).manifest
    main = dest / m.artifact.main
    target = main if main.is_file() else next(p for p in sorted(main.rglob("*")) if p.is_file())
    target.write_bytes(np.random.default_rng(0).bytes(max(64, target.stat().st_size)))
    write_bundle(dest, m, signing_key=signing_key)
    return write_tarball(dest)


def _row(answers: list[Any], agent: Any, task: Any, y: Any) -> dict[str, Any]:
    from device_agent.agent import summarize
    from edge_demo.story import answers_metric

    s = summarize(answers)
    return {"accuracy": answers_metric(task, answers, y), "offload_rate": s["offload_rate"], "inputs": s["inputs"],
            "drift_flag": bool((agent.last_drift or {}).get("flag")), "bundle_sha256": agent.bundle.manifest_sha256}


def close_the_loop(ctx: LoopContext, *, before: dict[str, Any], progress: Any = print) -> dict[str, Any]:
    from edge_demo.story import stream_answers
    from edgecore.bundle import tarball_path
    from toolchain.refresh import RefreshError, refresh
    from toolchain.refresh.gates import bundle_accuracy

    x_shifted, y_test = ctx.streams.drifted  # the stream the device is scored on, before and after
    # the device's model alone (no cloud): when the student is unsure of most drifted inputs, the cascade's accuracy
    # before the loop is already mostly the teacher's, and what the refresh changes shows here and in the offload rate
    before = {**before, "student_accuracy": bundle_accuracy(ctx.bundles_dir / ctx.bundle_name, x_shifted, y_test)}
    _upload(ctx, f"{ctx.bundle_name}-v1", tarball_path(ctx.bundles_dir / ctx.bundle_name))  # rollback needs it
    agent = _agent(ctx)
    try:
        progress(f"{ctx.device} streams more drifted inputs; the gateway collects its offloads")
        x_field = ctx.streams.field[0]
        # the operator asks the drifted device to send everything while it drifts (collection mode), then resets it
        usual, agent.config.drift_offload = agent.config.drift_offload, 1.0
        # paced: the drift flag is set when a telemetry window closes, so the stream must span several windows
        stream_answers(agent, x_field, max(ctx.rate_hz, len(x_field) / (20 * ctx.window_s)))
        agent.config.drift_offload = usual
        ctx.gateway.collector.flush()
        collected = _call(ctx, "GET", "/api/samples/stats")["devices"]
        progress(f"collected: {collected}; refreshing the student from the gateway's samples")
        out: dict[str, Any] = {"before": before, "collected": collected,
                               "teacher_accuracy_drifted": teacher_metric(ctx.run_dir, x_shifted, y_test)}
        shutil.rmtree(ctx.out / "run-refresh", ignore_errors=True)  # the demo's own output: a rerun (--reuse) redoes it
        try:
            rep = refresh(parent=ctx.run_dir, out=ctx.out / "run-refresh", source=ctx.gateway.http_url,
                          token=ctx.token, device=ctx.device, targets=[ctx.bundle_name],
                          signing_key=ctx.signing_key, show=False)
        except RefreshError as e:  # the gates refused the new student: nothing to roll out, the rollback still shown
            out["refresh_error"] = str(e)
            out["bad_rollout"] = _broken_rollout(ctx, progress)
            return out
        new_acc = next(s for s in reversed(rep["stages"]))["test_accuracy"]
        out.update(gates=rep["gates"], test_accuracy_original=new_acc, refresh_run=rep["run_dir"],
                   samples_used=rep["samples"]["train"], samples_held_out=rep["samples"]["holdout"])
        new_tar = tarball_path(Path(rep["bundles"][ctx.bundle_name]))
        _upload(ctx, f"{ctx.bundle_name}-refresh", new_tar)
        progress("canary rollout of the refreshed bundle to the drifted device")
        rid = _call(ctx, "POST", "/api/rollouts", {
            "bundle": f"{ctx.bundle_name}-refresh", "canary": [ctx.device], "watch_s": max(2.0, 2.5 * ctx.window_s),
            # against the device's own offload before the loop (its last windows were collection mode, sending
            # everything, so the rollout's baseline would say nothing); a quarter of slack for a short window
            "promote_if": f"rollbacks == 0 and drift == 0 and offload_rate <= {1.25 * before['offload_rate']:.4f}"})["id"]
        _wait(ctx, rid, {"watching", "done", "rolled_back", "failed"})
        after = stream_answers(agent, x_shifted, ctx.rate_hz)
        r = _wait(ctx, rid, {"done", "rolled_back", "failed", "awaiting_approval"})
        if r["state"] == "awaiting_approval":  # the gateway had no inputs of its own to judge it on: say so, approve
            progress(f"the gateway could not evaluate the bundle itself ({r['steps'][-1]['detail'].get('why')}); "
                     "the demo approves it as a person would")
            _call(ctx, "POST", f"/api/rollouts/{rid}/approve", {})
            r = _wait(ctx, rid, {"done", "rolled_back", "failed"})
        out["rollout"] = {"id": rid, "state": r["state"], "steps": [s["step"] for s in r["steps"]]}
        # the bundle the device runs now: the refreshed one if the canary was promoted, else the old one again
        alone = bundle_accuracy(agent.bundle.root, x_shifted, y_test)
        out["after"] = {**_row(after, agent, ctx.task, y_test), "student_accuracy": alone}
        out["bad_rollout"] = _broken_rollout(ctx, progress)
        return out
    finally:
        agent.stop()


def _broken_rollout(ctx: LoopContext, progress: Any) -> dict[str, Any]:
    """A deliberately broken bundle to the canary: the rollout must roll back, leaving no device on it."""
    progress("a deliberately broken bundle: the canary must refuse it and the rollout roll back")
    _upload(ctx, "broken", broken_copy(ctx.bundles_dir / ctx.bundle_name, ctx.out / "broken-bundle", ctx.signing_key))
    rid = _call(ctx, "POST", "/api/rollouts", {"bundle": "broken", "canary": [ctx.device], "watch_s": 2.0,
                                               "promote_if": "rollbacks == 0"})["id"]
    bad = _wait(ctx, rid, {"done", "rolled_back", "failed"})
    versions = _call(ctx, "GET", f"/api/rollouts/{rid}")["device_versions"]
    return {"id": rid, "state": bad["state"], "steps": [s["step"] for s in bad["steps"]],
            "devices_on_it": [d for d, v in versions.items() if v == bad["plan"]["manifest_sha256"]]}


def teacher_metric(run_dir: Path, x: np.ndarray, y: Any) -> float:
    """The cloud model's figure (the task's metric) on raw inputs ``x``, e.g. the drifted stream: what the loop
    can teach at best."""
    import torch

    from toolchain.rundir import RunDir

    run = RunDir(run_dir)
    xt = torch.from_numpy(run.input_spec.preprocess(x))
    return float(run.task.model_metric(run.load_teacher(), xt, torch.from_numpy(np.asarray(y))))
