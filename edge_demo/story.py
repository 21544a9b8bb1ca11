"""``toolchain demo``: the whole story in a few minutes, on digits (``--task classify``, the default) or on
generated shapes scenes (``--task detect``).

1. train the teacher, compress it (prune, distill, QAT), export ONNX;
2. build a bundle for every target and precision whose tooling is installed
   (and say plainly which were skipped and why);
3. start a local broker (Mosquitto when installed, else amqtt), the cloud
   gateway (teacher as ONNX, HTTP API + dashboard) and three device agents,
   one of them fed a drifted stream (rotated, noisy digits; blurred shapes
   scenes);
4. close the loop on the drifted device (collect, refresh, canary rollout);
5. benchmark every runnable bundle beside PyTorch eager;
6. print one summary (per device, per artifact) and leave everything in one
   folder: run, bundles, bench report and plots, routing curve, summary.

Every piece is the real one the CLIs use; the demo only wires them together. What depends on the data set
(the config, the streams) is the scenario's (`edge_demo.scenarios`); what depends on the task (the metric, the
answers) is the run's task's.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_demo.scenarios import Scenario, Streams, drifted, get_scenario
from edgecore.clikit import escape
from edgecore.errors import AgentError, EdgeError
from edgecore.fsutil import atomic_write_json, atomic_write_text

__all__ = ["FLEET", "DemoOptions", "drifted", "run_demo", "summary_markdown", "loop_markdown", "not_run_reasons"]

log = logging.getLogger(__name__)

#: device id -> bundles it prefers (first one built and runnable wins), fed a drifted stream?
FLEET: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("edge-1", ("onnx-int8", "onnx-fp32"), False),
    ("edge-2", ("openvino-int8", "openvino-fp32", "onnx-int8", "onnx-fp32"), False),
    ("edge-3", ("tflite-int8", "tflite-fp32", "onnx-int8", "onnx-fp32"), True),
)


@dataclass
class DemoOptions:
    out: Path = Path("demo_out")
    task: str = "classify"  # the scenario (`edge_demo.scenarios`): classify (digits) | detect (shapes)
    config: Path | None = None  # default: the scenario's (classify: ./toolchain.toml if present, else built-in)
    reuse: bool = False  # reuse a finished run in OUT/run instead of training again
    rate_hz: float = 120.0  # inputs per second per device: paced, so telemetry shows a time series
    window_s: float = 1.0  # telemetry window
    deadline_s: float = 1.0  # cloud answer deadline
    broker: str = "auto"  # auto | mosquitto | amqtt
    bench_seconds: float = 1.0
    serve_s: float = 0.0  # keep broker, gateway and dashboard up this long after the run
    targets: tuple[str, ...] = ()  # build only these targets (default: every target)
    latency_budget_ms: float | None = None  # compress to a measured onnx-fp32 latency instead of a MACs ratio
    loop: bool = True  # close the loop on the drifted device: collect, refresh, canary rollout (edge_demo/loop.py)


def _console() -> Any:
    from rich.console import Console

    return Console(width=150)



class _Steps:
    def __init__(self, total: int) -> None:
        self.n = 0
        self.total = total
        self.console = _console()

    def __call__(self, title: str) -> None:
        self.n += 1
        self.console.rule(f"[bold]step {self.n}/{self.total}: {title}")


def _pipeline(opts: DemoOptions, scenario: Scenario, run_dir: Path, step: _Steps) -> dict[str, Any]:
    from toolchain import pipeline

    cfg, cfg_label = scenario.config(opts.config)
    if opts.latency_budget_ms is not None:
        import dataclasses

        from toolchain.passes.prune import PruneTarget

        cfg = dataclasses.replace(cfg, prune=dataclasses.replace(
            cfg.prune, target=PruneTarget.LATENCY, latency_budget_ms=opts.latency_budget_ms))
    step("train the teacher, compress it into a student, export ONNX")
    if opts.reuse and (run_dir / "student_qdq.onnx").exists() and (run_dir / "teacher.onnx").exists():
        step.console.print(f"reusing the finished run in {run_dir}")
        return {"reused": str(run_dir), "config": cfg_label}
    report = pipeline.run_all(cfg, run_dir)
    report["config"] = cfg_label
    return report


def _signing_key(out: Path) -> tuple[Any, Path]:
    """The demo's release key (``OUT/keys/demo.key``, made once): bundles are signed, agents trust ``demo.pub``.
    Beside it the gateway's command key (`command_key_prefix`), made once too."""
    from edgecore.signing import load_private_key, new_keypair

    prefix = out / "keys" / "demo"
    for p in (prefix, command_key_prefix(prefix.with_suffix(".pub"))):
        if not p.with_suffix(".key").exists():
            new_keypair(p)
    return load_private_key(prefix.with_suffix(".key")), prefix.with_suffix(".pub")


def command_key_prefix(release_pub: Path) -> Path:
    """The gateway's command key beside the demo's release key: the gateway signs commands with ``.key``, the
    agents trust ``.pub`` (a command key is not a release key: the gateway never holds the one that signs bundles)."""
    return release_pub.parent / "gateway-commands"


def command_trust(release_pub: Path) -> Any:
    from edgecore.commands import CommandTrust

    return CommandTrust.from_paths([command_key_prefix(release_pub).with_suffix(".pub")])


def _build_all(
    run_dir: Path, bundles_dir: Path, targets: tuple[str, ...], step: _Steps, signing_key: Any = None,
) -> tuple[dict[str, dict], list[dict], list[dict]]:
    from toolchain.bundle import build_bundle, build_each
    from toolchain.commands.build import plan
    from toolchain.rundir import RunDir

    step("build a bundle for every target whose tooling is installed")
    cfg = RunDir(run_dir).config()
    todo, skipped = plan("all", "all")
    if targets:
        todo = [(t, p) for t, p in todo if t in targets]
        skipped = [s for s in skipped if s["target"] in targets]
    for s in skipped:
        step.console.print(f"[yellow]skipped target {s['target']}[/]: {escape(s['reason'])}")
    done, failures = build_each(
        todo, lambda t, p: build_bundle(run_dir=run_dir, target=t, precision=p, out=bundles_dir / f"{t}-{p}",
                                        cfg=cfg.build, signing_key=signing_key),
        on_step=lambda t, p: step.console.print(f"building {t} {p}", highlight=False),
    )
    built = {f"{t}-{p}": rep for (t, p), rep in done.items()}
    failed = [{"bundle": f"{f['target']}-{f['precision']}", "error": f["error"]} for f in failures]
    for f in failed:
        step.console.print(f"[red]{f['bundle']} not built[/]: {escape(f['error'])}")
    return built, skipped, failed


def _runnable(name: str, built: dict[str, dict]) -> bool:
    from targets import get_target

    if name not in built:
        return False
    return get_target(name.split("-")[0]).available()[0]


def _fleet_plan(built: dict[str, dict], step: _Steps) -> list[tuple[str, str, bool]]:
    """(device, bundle, drifted stream) for each device whose preferred bundle was built and runs here."""
    plan: list[tuple[str, str, bool]] = []
    for device_id, prefs, drift in FLEET:
        choice = next((b for b in prefs if _runnable(b, built)), None)
        if choice is None:
            step.console.print(f"[yellow]{device_id} not started[/]: none of {', '.join(prefs)} was built")
            continue
        plan.append((device_id, choice, drift))
    if not plan:
        raise AgentError("no runnable bundle was built, so no device agent can start")
    return plan


def _gateway(opts: DemoOptions, run_dir: Path, fleet_dir: Path, broker: Any, creds: Any, token: str,
             public_key: Path) -> Any:
    from cloud_gateway.config import CollectionPolicy, GatewayConfig, WorkerConfig
    from cloud_gateway.service import Gateway
    from edgecore.bundle import TrustPolicy

    drifting = ",".join(d for d, _, drift in FLEET if drift)
    return Gateway(GatewayConfig(
        worker=WorkerConfig(broker_url=broker.url, username=creds.gateway[0], password=creds.gateway[1],
                            mqtt_version=broker.mqtt_version),
        teacher=run_dir / "teacher.onnx", db=str(fleet_dir / "gateway.sqlite"),
        bundles_dir=fleet_dir / "gateway-bundles", http_port=0, token=token,
        trust=TrustPolicy.from_paths([public_key]),
        collect=CollectionPolicy.parse(drifting if opts.loop else None), rollout_update_timeout_s=15.0,
        command_key=command_key_prefix(public_key).with_suffix(".key"),
    ))


def _start_agents(opts: DemoOptions, plan: list[tuple[str, str, bool]], bundles_dir: Path, fleet_dir: Path,
                  broker: Any, creds: Any, public_key: Path) -> dict[str, Any]:
    from device_agent.agent import Agent, AgentConfig
    from edgecore.bundle import TrustPolicy

    trust = TrustPolicy.from_paths([public_key])
    agents: dict[str, Any] = {}
    for device_id, bundle_name, _ in plan:
        agents[device_id] = Agent(bundles_dir / bundle_name, AgentConfig(
            device_id=device_id, broker_url=broker.url, username=device_id, password=creds.devices[device_id],
            deadline_s=opts.deadline_s, telemetry_window_s=opts.window_s, state_dir=fleet_dir / "agents" / device_id,
            mqtt_version=broker.mqtt_version, trust=trust, command_trust=command_trust(public_key),
        )).start()
    return agents


def _stream(opts: DemoOptions, agents: dict[str, Any], plan: list[tuple[str, str, bool]],
            streams: Streams) -> dict[str, list[Any]]:
    """Feed every device its stream (drifted or not) in parallel, paced; returns the answers per device, in
    the stream's order."""
    from edgecore.clikit import progress_bar

    total = sum(len((streams.drifted if drift else streams.clean)[0]) for _, _, drift in plan)
    bar = progress_bar(total=total, unit="input", desc="streaming to the fleet")
    bar_lock = threading.Lock()
    answers: dict[str, list[Any]] = {}
    errors: dict[str, BaseException] = {}

    def tick(_: Any) -> None:
        with bar_lock:
            bar.update(1)

    def feed(device_id: str, drift: bool) -> None:
        try:
            answers[device_id] = stream_answers(agents[device_id], (streams.drifted if drift else streams.clean)[0],
                                                opts.rate_hz, on_answer=tick)
        except BaseException as e:
            errors[device_id] = e

    threads = [threading.Thread(target=feed, args=(d, drift), name=f"feed-{d}") for d, _, drift in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    for device_id, e in errors.items():
        raise EdgeError(f"device agent {device_id} failed: {e}") from e
    return answers


def stream_answers(agent: Any, x: np.ndarray, rate_hz: float, on_answer: Any = None) -> list[Any]:
    """Every input of ``x`` through a started agent, paced at ``rate_hz`` (the feeder's pacer, `device-agent
    feed|run --rate`: one way to hold a rate); the answers in ``x``'s order."""
    from device_agent.sources import iterator_source, paced

    answers = list(agent.run(paced(iterator_source(iter(x), agent.bundle.input_spec), rate_hz), on_answer=on_answer))
    return sorted(answers, key=lambda a: int(a.id))


def answers_metric(task: Any, answers: list[Any], targets: Any) -> float | None:
    """The task's headline metric of a device's answers against the stream's targets (None without answers)."""
    return task.answers_metric([a.prediction for a in answers], targets) if answers else None


def _device_row(device_id: str, bundle_name: str, stream: str, agent: Any, answers: list[Any],
                metric: float | None) -> dict[str, Any]:
    from device_agent.agent import summarize

    lat = np.array([a.latency_s for a in answers]) * 1000.0
    s = summarize(answers)
    last = agent.last_drift or {}
    return {
        "device": device_id, "bundle": bundle_name, "stream": stream,
        "inputs": s["inputs"], "accuracy": metric, "offload_rate": s["offload_rate"],
        "cloud": s["cloud"], "fallbacks": s["fallback"],
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "drift_flag": bool(last.get("flag")), "drift": last,
    }


def _run_fleet(
    opts: DemoOptions, scenario: Scenario, run_dir: Path, bundles_dir: Path, built: dict[str, dict], step: _Steps,
    public_key: Path, signing_key: Any = None,
) -> dict[str, Any]:
    from cloud_gateway.broker import start_local_broker
    from cloud_gateway.credentials import make_fleet, write_fleet_files
    from toolchain.rundir import RunDir

    step("start the broker, the cloud gateway and three device agents")
    plan = _fleet_plan(built, step)
    fleet_dir = opts.out / "fleet"
    creds = make_fleet(device_ids=[d for d, _, _ in plan])
    write_fleet_files(creds, fleet_dir / "credentials")
    broker = start_local_broker(fleet_dir / "broker", creds, prefer=opts.broker)
    step.console.print(f"broker: {type(broker).__name__} on {broker.url} (MQTT {broker.mqtt_version})")
    token = secrets.token_urlsafe(16)
    gateway = _gateway(opts, run_dir, fleet_dir, broker, creds, token, public_key)
    streams = scenario.streams(run_dir)
    task = RunDir(run_dir).task
    agents: dict[str, Any] = {}
    try:
        gateway.start()
        step.console.print(f"gateway: dashboard at {gateway.http_url}/  (write token in {fleet_dir}/token)")
        atomic_write_text(fleet_dir / "token", token + "\n")
        agents = _start_agents(opts, plan, bundles_dir, fleet_dir, broker, creds, public_key)
        answers = _stream(opts, agents, plan, streams)
        devices = []
        for device_id, bundle_name, drift in plan:
            agents[device_id].stop()
            stream_name, (_, y) = ((streams.drifted_name, streams.drifted) if drift
                                   else (streams.clean_name, streams.clean))
            devices.append(_device_row(device_id, bundle_name, stream_name, agents[device_id], answers[device_id],
                                       answers_metric(task, answers[device_id], y)))
        time.sleep(opts.window_s)  # let the last telemetry reach the store
        results = {"devices": devices, "broker": type(broker).__name__, "dashboard": f"{gateway.http_url}/",
                   "gateway_view": _get_json(f"{gateway.http_url}/api/devices?limit=500")}
        drifted_dev = next(((d, b) for d, b, drift in plan if drift), None)
        if opts.loop and drifted_dev is not None:
            from edge_demo.loop import LoopContext, close_the_loop

            step("close the loop: collect the drifted device's hard inputs, refresh, canary rollout")
            before = next(r for r in devices if r["device"] == drifted_dev[0])
            results["refresh"] = close_the_loop(LoopContext(
                gateway=gateway, broker=broker, creds=creds, token=token, public_key=public_key,
                signing_key=signing_key, run_dir=run_dir, bundles_dir=bundles_dir, out=opts.out,
                device=drifted_dev[0], bundle_name=drifted_dev[1], window_s=opts.window_s, rate_hz=opts.rate_hz,
                streams=streams, task=task,
            ), before={k: before[k] for k in ("accuracy", "offload_rate", "drift_flag", "bundle")},
                progress=lambda m: step.console.print(m, highlight=False))
        if opts.serve_s > 0:
            step.console.print(f"[bold]serving the dashboard at {gateway.http_url}/ for {opts.serve_s:.0f} s (Ctrl-C stops)")
            try:
                time.sleep(opts.serve_s)
            except KeyboardInterrupt:
                pass
        return results
    finally:
        for agent in agents.values():
            agent.stop()  # no-op for an agent already stopped
        gateway.stop()
        broker.stop()


def _get_json(url: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _bench(opts: DemoOptions, run_dir: Path, bundles_dir: Path, built: dict[str, dict], step: _Steps) -> dict[str, Any]:
    from hw_bench.loadgen import Settings
    from hw_bench.local import run_local
    from hw_bench.report import report
    from hw_bench.results import write_run

    step("benchmark every runnable bundle beside PyTorch eager")
    names = [n for n in built if _runnable(n, built)]
    if not names:
        return {"skipped": "no runnable bundle"}
    bench_dir = opts.out / "bench"
    run = run_local(
        bundles=[bundles_dir / n for n in names],
        settings=Settings(min_duration_s=opts.bench_seconds, min_queries=200, warmup=20),
        repetitions=1, run_dirs=[run_dir], vendor_check=False,
        progress=lambda msg: step.console.print(f"  {msg}"),
    )
    results_path = write_run(bench_dir / "results.json", run)
    paths = report([results_path], bench_dir)
    rows = [{k: v for k, v in r.items() if k != "latencies_ms"} for r in run["results"]]
    return {"results": str(results_path), **{k: str(v) for k, v in paths.items()}, "rows": rows}


def _latency_by_bundle(bench: dict[str, Any]) -> dict[str, float]:
    """``{"onnx-int8": p50 ms}`` from the bench rows (the PyTorch baseline under "pytorch-fp32")."""
    out: dict[str, float] = {}
    for row in bench.get("rows", []):
        p50 = (row.get("latency_ms") or {}).get("p50")
        if p50 is not None and row.get("target") and row.get("precision"):
            out[f"{row['target']}-{row['precision']}"] = float(p50)
    return out


def not_run_reasons(summary: dict[str, Any]) -> dict[str, str]:
    """``{target: why}`` for targets whose bundles were built but could not be run here."""
    out: dict[str, str] = {}
    for name, r in summary["bundles"].items():
        v = r.get("verify", {})
        if v.get("status") in ("skipped", "proxy", "unverified"):
            proxy = {"proxy": f" (accuracy from a PROXY: {v.get('runtime')})",
                     "unverified": f" (accuracy UNVERIFIED, a stand-in for the artifact: {v.get('runtime')})"}.get(
                         str(v.get("status")), "")
            out.setdefault(name.split("-")[0], str(v.get("reason", "")) + proxy)
    return out


def _artifact_cells(r: dict[str, Any], pct: Any) -> tuple[str, str, str]:
    """accuracy, agreement and verify cells of one bundle; a proxy figure is marked as one."""
    from toolchain.verify import shown_accuracy, verify_label

    acc, agree, proxy = shown_accuracy(r["metrics"])
    mark = " (proxy)" if proxy else ""
    return pct(acc) + (mark if acc is not None else ""), pct(agree) + (mark if agree is not None else ""), \
        verify_label(r.get("verify", {}))


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary tables as Markdown, for people who open the folder later."""
    lat = _latency_by_bundle(summary.get("bench", {}))
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    metric = summary.get("metric", "accuracy")
    lines = ["# Demo summary", "", f"Ran in {summary['seconds']} s. Dashboard was at {summary['fleet'].get('dashboard', '-')}.",
             "", "## Devices", "", f"| device | bundle | stream | inputs | {metric} | offload | fallbacks | p50 ms | p99 ms | drift |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for d in summary["fleet"].get("devices", []):
        lines.append(f"| {d['device']} | {d['bundle']} | {d['stream']} | {d['inputs']} | {pct(d['accuracy'])} | "
                     f"{pct(d['offload_rate'])} | {d['fallbacks']} | {d['p50_ms']:.2f} | {d['p99_ms']:.2f} | "
                     f"{'**DRIFT**' if d['drift_flag'] else 'ok'} |")
    lines += loop_markdown(summary.get("refresh"), metric=metric)
    lines += ["", "## Artifacts", "", f"| bundle | size KiB | {metric} | agreement | verify | p50 ms |", "|---|---:|---:|---:|---|---:|"]
    for name, r in summary["bundles"].items():
        m = r["metrics"]
        acc, agree, ver = _artifact_cells(r, pct)
        lines.append(f"| {name} | {m['size_bytes'] / 1024:.1f} | {acc} | {agree} | {ver} | "
                     f"{f'{lat[name]:.3f}' if name in lat else '-'} |")
    not_run = not_run_reasons(summary)
    if not_run:
        lines += ["", "## Built but not run on the target's runtime here", ""] + [f"- {t}: {why}" for t, why in not_run.items()]
    if summary["skipped_targets"]:
        lines += ["", "## Skipped targets", ""] + [f"- {s['target']}: {s['reason']}" for s in summary["skipped_targets"]]
    if summary["failed_builds"]:
        lines += ["", "## Failed builds", ""] + [f"- {f['bundle']}: {f['error']}" for f in summary["failed_builds"]]
    lines += ["", "Bench report: bench/report.md (latency.png, pareto.png). Routing curve: routing_curve.png.", ""]
    return "\n".join(lines)


def loop_markdown(r: dict[str, Any] | None, *, metric: str = "accuracy") -> list[str]:
    """The closed loop's before/after for the drifted device (Markdown lines; empty when it did not run);
    ``metric`` names the task's headline figure."""
    if not r:
        return []
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    lines = ["", "## Closed loop (drifted device)", ""]
    bad = r.get("bad_rollout")
    bad_line = ([f"Broken bundle rollout: **{bad['state']}** ({' -> '.join(bad['steps'])}); "
                 f"devices left on it: {bad['devices_on_it'] or 'none'}."] if bad else [])
    if "refresh_error" in r:
        return lines + [f"refresh refused: {r['refresh_error']}", ""] + bad_line
    b, a = r["before"], r.get("after") or {}
    lines += [f"Collected {sum(d['samples'] for d in r['collected'])} offloaded inputs with the teacher's answers "
              f"(teacher on the drifted stream: {pct(r['teacher_accuracy_drifted'])}); refreshed run "
              f"{r['refresh_run']} (original test split: {pct(r['test_accuracy_original'])}).", "",
              f"| | {metric} | device model alone | offload | drift |", "|---|---:|---:|---:|---|",
              f"| before | {pct(b['accuracy'])} | {pct(b.get('student_accuracy'))} | {pct(b['offload_rate'])} | "
              f"{'DRIFT' if b['drift_flag'] else 'ok'} |",
              f"| after | {pct(a.get('accuracy'))} | {pct(a.get('student_accuracy'))} | {pct(a.get('offload_rate'))} | "
              f"{'DRIFT' if a.get('drift_flag') else 'ok'} |", "",
              f"Canary rollout: **{r['rollout']['state']}** ({' -> '.join(r['rollout']['steps'])}).", *bad_line]
    return lines


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    console = _console()
    console.rule("[bold]summary")
    metric = summary.get("metric", "accuracy")
    t = Table(title="devices (one agent per row, all through the real broker)")
    for col in ("device", "bundle", "stream", "inputs", metric, "offload", "fallbacks", "p50 ms", "p99 ms", "drift"):
        t.add_column(col, justify="right" if col not in ("device", "bundle", "stream", "drift") else "left")
    for d in summary["fleet"].get("devices", []):
        t.add_row(
            d["device"], d["bundle"], d["stream"], str(d["inputs"]),
            "-" if d["accuracy"] is None else f"{d['accuracy']:.1%}", f"{d['offload_rate']:.1%}",
            str(d["fallbacks"]), f"{d['p50_ms']:.2f}", f"{d['p99_ms']:.2f}",
            "[red bold]DRIFT[/]" if d["drift_flag"] else "[green]ok[/]",
        )
    console.print(t)
    for line in loop_markdown(summary.get("refresh"), metric=metric):
        console.print(line.replace("**", ""), highlight=False)
    lat = _latency_by_bundle(summary.get("bench", {}))
    a = Table(title=f"artifacts ({metric} on the test split; latency: single-stream p50 on this machine)")
    for col in ("bundle", "size", metric, "agreement", "verify", "p50 ms"):
        a.add_column(col, justify="left" if col in ("bundle", "verify") else "right")
    pct2 = lambda v: "-" if v is None else f"{v:.2%}"  # noqa: E731
    for name, r in summary["bundles"].items():
        m = r["metrics"]
        acc, agree, ver = _artifact_cells(r, pct2)
        a.add_row(name, f"{m['size_bytes'] / 1024:.1f} KiB", acc, agree, escape(ver),
                  f"{lat[name]:.3f}" if name in lat else "-")
    console.print(a)
    for target, why in not_run_reasons(summary).items():
        console.print(f"[yellow]{target} bundles built and checked, not run on {target}'s runtime here[/]: {escape(why)}")
    for s in summary["skipped_targets"]:
        console.print(f"[yellow]target {s['target']} skipped[/]: {escape(s['reason'])}")
    for f in summary["failed_builds"]:
        console.print(f"[red]{f['bundle']} failed[/]: {escape(f['error'])}")
    console.print(f"\n[bold]everything is in {summary['out']}[/]: summary.json, summary.md, run/, bundles/, "
                  "bench/ (report.md, latency.png, pareto.png), routing_curve.png")


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Run the whole story; returns the summary (also written to OUT/summary.json)."""
    t0 = time.perf_counter()
    scenario = get_scenario(opts.task)  # an unknown one fails now, naming the known ones
    if opts.targets:
        from targets import get_target

        for name in opts.targets:
            get_target(name)  # an unknown name fails now, listing the known ones, not after training
    opts.out = Path(opts.out)
    opts.out.mkdir(parents=True, exist_ok=True)
    run_dir, bundles_dir = opts.out / "run", opts.out / "bundles"
    step = _Steps(6 if opts.loop else 5)
    pipe = _pipeline(opts, scenario, run_dir, step)
    signing_key, public_key = _signing_key(opts.out)
    built, skipped, failed = _build_all(run_dir, bundles_dir, opts.targets or scenario.targets, step, signing_key)
    curve = next((bundles_dir / n / "routing_curve.png" for n in built if (bundles_dir / n / "routing_curve.png").exists()), None)
    if curve is not None:
        shutil.copyfile(curve, opts.out / "routing_curve.png")
    fleet = _run_fleet(opts, scenario, run_dir, bundles_dir, built, step, public_key, signing_key)
    bench = _bench(opts, run_dir, bundles_dir, built, step)
    step("summary")
    from toolchain.rundir import RunDir

    summary = {
        "out": str(opts.out.resolve()),
        "task": scenario.name,
        "metric": RunDir(run_dir).task.metric_name,
        "seconds": round(time.perf_counter() - t0, 1),
        "pipeline": pipe,
        "bundles": built,
        "skipped_targets": skipped,
        "failed_builds": failed,
        "fleet": fleet,
        "bench": bench,
    }
    if "refresh" in fleet:
        summary["refresh"] = fleet.pop("refresh")
    atomic_write_json(opts.out / "summary.json", summary)
    atomic_write_text(opts.out / "summary.md", summary_markdown(summary))
    _print_summary(summary)
    return summary
