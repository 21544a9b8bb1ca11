"""Reports from result files: a Markdown table and PNG plots (matplotlib, Agg).

``report(paths, out_dir)`` writes ``report.md`` (environment, results table with
speed-up vs PyTorch and accuracy, int8-vs-fp32 per runtime, vendor
cross-checks, fleet device status), ``latency.png`` (latency distribution per
artifact) and ``pareto.png`` (accuracy against p50 latency per model, the
Pareto front drawn). Cloud side (matplotlib is imported inside).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from edgecore.errors import BenchError
from edgecore.fsutil import atomic_write_text

from .envinfo import int8_hint
from .ratios import Ratio, paired, pooled, row_scores
from .results import read_run, rows_with_env

TARGET_COLORS = {"pytorch": "#7f7f7f", "onnx": "#1f77b4", "openvino": "#d62728", "tflite": "#ff7f0e",
                 "coreml": "#9467bd", "jetson": "#2ca02c"}


def _fmt(v: Any, spec: str = ".3g", none: str = "–") -> str:
    if v is None:
        return none
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return str(v)


def _ms(v: Any) -> str:
    if v is None:
        return "–"
    v = float(v)
    return f"{v:,.0f}" if v >= 1000 else f"{v:.3g}"


def _acc(row: dict[str, Any]) -> float | None:
    a = row.get("accuracy")
    if isinstance(a, dict):
        return a.get("accuracy")
    return a


def _size(n: Any) -> str:
    if not n:
        return "–"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _label(row: dict[str, Any]) -> str:
    dev = row.get("device_id")
    return f"{row['artifact']} @{dev}" if dev else str(row["artifact"])


def int8_vs_fp32(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (device, model, target): int8's speed-up over fp32 (>1 = int8 faster), defined as every hw-bench ratio
    (`hw_bench.ratios`): the median of the per-round ratios of one run, with their range; rows of different runs
    fall back to the pooled p50s, marked."""
    by: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r.get("kind") == "pytorch":
            continue
        key = (r.get("device_id"), r.get("model"), r.get("target"), r.get("scenario"))
        by.setdefault(key, {})[str(r.get("precision"))] = r
    out = []
    for (dev, model, target, scen), p in by.items():
        if "fp32" in p and "int8" in p:
            f, i = p["fp32"], p["int8"]
            fs, is_ = row_scores(f), row_scores(i)
            if fs and is_ and len(fs) == len(is_) and f.get("_run") == i.get("_run"):
                ratio = paired(is_, fs)  # scores are higher-is-better: int8 / fp32 is int8's speed-up
            else:
                ratio = pooled(f["latency_ms"]["p50"], i["latency_ms"]["p50"]) if scen != "offline" else \
                    pooled(i["throughput_sps"], f["throughput_sps"])
            out.append({
                "device_id": dev, "model": model, "target": target, "scenario": scen,
                "fp32_p50_ms": f["latency_ms"]["p50"], "int8_p50_ms": i["latency_ms"]["p50"],
                "speedup": ratio.median, "speedup_range": [ratio.lo, ratio.hi], "speedup_rounds": ratio.rounds,
                "speedup_text": str(ratio),
                "fp32_accuracy": _acc(f), "int8_accuracy": _acc(i),
                "fp32_post_share": (f.get("postprocess") or {}).get("share"),
                "int8_post_share": (i.get("postprocess") or {}).get("share"),
                "post_name": (i.get("postprocess") or {}).get("name"),
            })
    return out


def post_name(rows: Iterable[dict[str, Any]]) -> str | None:
    """The name of the rows' per-frame post step (a detector's ``decode+NMS``), None when no row has one."""
    names = list(dict.fromkeys(str(r["postprocess"].get("name")) for r in rows if r.get("postprocess")))
    return " / ".join(names) if names else None


def post_cell(row: dict[str, Any]) -> str:
    """``0.412 (7.9%)``: the row's post step p50 and its share of the frame's p50 (runtime + post step)."""
    p = row.get("postprocess")
    if not p:
        return "–"
    share = p.get("share")
    return f"{_ms(p['latency_ms']['p50'])} ({'–' if share is None else format(100 * float(share), '.1f')}%)"


def speedup_text(row: dict[str, Any]) -> str:
    """The row's speed-up vs PyTorch as every hw-bench ratio prints: median (min–max over rounds)."""
    sp = row.get("speedup_vs_pytorch")
    if sp is None:
        return "–"
    lo, hi = row.get("speedup_range") or [sp, sp]
    n = len(row.get("round_scores") or []) or (1 if row.get("speedup_range") else 0)
    return str(Ratio(float(sp), float(lo), float(hi), n if lo != hi else max(n, 1)))


def markdown(runs: list[dict[str, Any]], rows: list[dict[str, Any]], sources: list[str]) -> str:
    L: list[str] = ["# hw-bench report", ""]
    L.append("Sources: " + ", ".join(f"`{s}`" for s in sources))
    L.append("")
    envs = _envs(runs)
    L += _env_section(envs)
    L += _fleet_section([d for run in runs for d in run.get("devices", [])])
    L += _results_section(rows)
    L += _int8_section(int8_vs_fp32(rows), envs)
    L += _cross_check_section([c for run in runs for c in run.get("cross_checks", [])])
    L += not_run_section([n for run in runs for n in run.get("not_run", [])])
    notes = [n for run in runs for n in run.get("notes", [])]
    if notes:
        L += ["## Notes", ""] + [f"- {n}" for n in dict.fromkeys(notes)] + [""]
    L += ["## Plots", "", "![latency distribution](latency.png)", "", "![accuracy vs latency](pareto.png)", ""]
    return "\n".join(L)


def _envs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every distinct environment of the runs and their fleet devices, in order."""
    envs: list[dict[str, Any]] = []
    for run in runs:
        for e in [run.get("env")] + list(run.get("envs", [])) + [d.get("env") for d in run.get("devices", [])]:
            if e and e not in envs:
                envs.append(e)
    return envs


def _env_section(envs: list[dict[str, Any]]) -> list[str]:
    if not envs:
        return []
    L = ["## Environment", "",
         "| host | CPU | cores (logical/usable) | ISA | threads | load avg 1/5/15 min | steal % | python | date |",
         "|---|---|---|---|---|---|---|---|---|"]
    for e in envs:
        cpu = e.get("cpu", {})
        isa = ", ".join(k for k, v in (cpu.get("isa") or {}).items() if v) or "–"
        L.append(f"| {e.get('hostname')} | {cpu.get('model')} | {cpu.get('logical_cores')}/{cpu.get('usable_cores')} "
                 f"| {isa} | {e.get('threads') or 'default'} | {' / '.join(map(str, e.get('load_avg') or [])) or '–'} "
                 f"| {'–' if e.get('steal_pct') is None else e['steal_pct']} | {e.get('python')} | {e.get('date')} |")
    return L + [""]


def _fleet_section(fleet: list[dict[str, Any]]) -> list[str]:
    if not fleet:
        return []
    L = ["## Fleet devices", "", "| device | status | detail |", "|---|---|---|"]
    for d in fleet:
        status = "ok" if d.get("ok") else ("no answer" if d.get("status") == "timeout" else "error")
        L.append(f"| {d['device_id']} | {status} | {d.get('error') or d.get('env', {}).get('cpu', {}).get('model', '')} |")
    return L + [""]


def _results_section(rows: list[dict[str, Any]]) -> list[str]:
    post = post_name(rows)
    L = ["## Results", "",
         "Latency per query (batch 1 for single-stream): the runtime call; throughput in samples/s; speed-up = "
         "PyTorch eager fp32 p50 / this p50 (offline: throughput ratio): the median of the per-round ratios over "
         "interleaved rounds, with their min–max."
         + (f" {post}: the task's step after the runtime call on the same outputs, timed apart per "
            "query; its share is its p50 over the p50 of the frame (runtime + that step)." if post else ""), "",
         "| artifact | device | target | precision | scenario | batch | p50 ms | p99 ms |"
         + (f" {post} p50 ms (share of frame) |" if post else "")
         + " throughput/s | speed-up vs PyTorch | accuracy | size |",
         "|---|---|---|---|---|---|---|---|" + ("---|" if post else "") + "---|---|---|---|"]
    for r in rows:
        lat = r.get("latency_ms", {})
        L.append(
            f"| {r['artifact']} | {r.get('device_id') or r['_env'].get('hostname', '')} | {r.get('target')} | {r.get('precision')} "
            f"| {r.get('scenario')} | {r.get('batch_size')} | {_ms(lat.get('p50'))} | {_ms(lat.get('p99'))} "
            + (f"| {post_cell(r)} " if post else "")
            + f"| {_tput(r.get('throughput_sps'))} | {speedup_text(r)} "
            f"| {_fmt(_acc(r), '.4f')} | {_size(r.get('size_bytes'))} |"
        )
    return L + [""]


def _int8_section(iv: list[dict[str, Any]], envs: list[dict[str, Any]]) -> list[str]:
    if not iv:
        return []
    post = " / ".join(dict.fromkeys(str(x["post_name"]) for x in iv if x["int8_post_share"] is not None))
    L = ["## int8 vs fp32 per runtime", "",
         "int8's speed-up = median over the run's interleaved rounds of the per-round ratio (1/p50 single-stream, "
         "samples/s offline), with its min–max: the same definition as the speed-up vs PyTorch above.", "",
         "| model | target | scenario | fp32 p50 ms | int8 p50 ms | int8 speed-up (min–max) | fp32 acc | int8 acc |"
         + (f" {post} share of frame, fp32 / int8 |" if post else ""),
         "|---|---|---|---|---|---|---|---|" + ("---|" if post else "")]
    for x in iv:
        shares = ""
        if post:
            shares = " | " + " / ".join("–" if v is None else f"{100 * float(v):.1f}%"
                                        for v in (x["fp32_post_share"], x["int8_post_share"]))
        L.append(f"| {x['model']}{' @' + x['device_id'] if x['device_id'] else ''} | {x['target']} | {x['scenario']} "
                 f"| {_fmt(x['fp32_p50_ms'])} | {_fmt(x['int8_p50_ms'])} | {x['speedup_text']} "
                 f"| {_fmt(x['fp32_accuracy'], '.4f')} | {_fmt(x['int8_accuracy'], '.4f')}{shares} |")
    cpu = (envs[0].get("cpu") if envs else None) or {}
    if cpu:
        L += ["", f"CPU: {cpu.get('model')}: {int8_hint(cpu)}."]
    return L + [""]


def _cross_check_section(checks: list[dict[str, Any]]) -> list[str]:
    if not checks:
        return []
    L = ["## Vendor tool cross-check", "",
         "Same IR, same threads, one stream, sync API, batch 1, f32 inference; alternating rounds, medians.", "",
         "| artifact | tool | tool median ms | our p50 ms | ours / tool (latency) | tool throughput/s | our throughput/s | ours / tool (throughput) |",
         "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        if c.get("available"):
            L.append(f"| {c['artifact']} | {c['tool']} | {_fmt(c['median_ms'])} | {_fmt(c['ours_median_ms'])} "
                     f"| {_fmt(c['latency_ratio'], '.3f')} | {_tput(c['throughput_sps'])} "
                     f"| {_tput(c['ours_throughput_sps'])} | {_fmt(c['throughput_ratio'], '.3f')} |")
        else:
            L.append(f"| {c['artifact']} | {c['tool']} | absent: {c.get('reason')} | | | | | |")
    return L + [""]


def build_accuracy_cell(n: dict[str, Any]) -> str:
    """The build's accuracy of a bundle not run here: the target runtime's figure, else the proxy's, marked."""
    if n.get("build_accuracy") is not None:
        return f"{_fmt(n['build_accuracy'], '.4f')} ({n.get('build_verify')} at build)"
    if n.get("proxy_accuracy") is not None:
        return f"{_fmt(n['proxy_accuracy'], '.4f')} PROXY ({n.get('proxy_runtime')})"
    return "–"


def not_run_section(not_run: list[dict[str, Any]]) -> list[str]:
    if not not_run:
        return []
    L = ["## Not run on this machine", "",
         "Their target's runtime is absent here: no latency. Accuracy as the build measured it; a PROXY figure "
         "comes from a stand-in of the runtime, not from the target itself.", "",
         "| artifact | target | precision | build verify | accuracy | reference | size | why not run |",
         "|---|---|---|---|---|---|---|---|"]
    for n in not_run:
        L.append(f"| {n['artifact']} | {n['target']} | {n['precision']} | {n.get('build_verify') or '–'} "
                 f"| {build_accuracy_cell(n)} | {_fmt(n.get('reference_accuracy'), '.4f')} | {_size(n.get('size_bytes'))} "
                 f"| {n.get('reason', '')} |")
    return L + [""]


def _plain_ticks(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _tput(v: Any) -> str:
    if v is None:
        return "–"
    v = float(v)
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def plot_latency(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("latencies_ms")]
    # one box per row (the runtime call); a row with a per-frame post step (a detector's decode+NMS) gets a second,
    # hatched box: the whole frame (runtime + that step, per query)
    boxes: list[tuple[list[float], str, dict[str, Any], bool]] = []
    for r in rows:
        boxes.append((r["latencies_ms"], f"{_label(r)}  b{r.get('batch_size')}  p50 {r['latency_ms']['p50']:.3g} ms", r, False))
        p = r.get("postprocess")
        if p and p.get("frame_latencies_ms"):
            share = "" if p.get("share") is None else f", {100 * float(p['share']):.1f}%"
            boxes.append((p["frame_latencies_ms"], f"  frame (runtime + {p.get('name')} {p['latency_ms']['p50']:.3g} ms"
                          f"{share})  p50 {p['frame_ms']['p50']:.3g} ms", r, True))
    fig_h = max(2.5, 0.45 * len(boxes) + 1.2)
    fig, ax = plt.subplots(figsize=(10, fig_h), dpi=110)
    if not boxes:
        ax.text(0.5, 0.5, "no latency samples", ha="center", va="center")
        ax.set_axis_off()
    else:
        data = [b[0] for b in boxes]
        labels = [b[1] for b in boxes]
        bp = ax.boxplot(data, vert=False, whis=(1, 99), showfliers=False, patch_artist=True, widths=0.6,
                        medianprops={"color": "black", "linewidth": 1.6})
        for patch, (_, _, r, frame) in zip(bp["boxes"], boxes):
            patch.set_facecolor(TARGET_COLORS.get(str(r.get("target")), "#bbbbbb"))
            patch.set_alpha(0.45 if frame else 0.75)
            if frame:
                patch.set_hatch("//")
        ax.set_yticks(range(1, len(boxes) + 1), labels, fontsize=8)
        lo = min(min(d) for d in data)
        hi = max(max(d) for d in data)
        if hi / max(lo, 1e-9) > 20:
            ax.set_xscale("log")
            _plain_ticks(ax)
        ax.invert_yaxis()
        ax.set_xlabel("latency per query, ms (box: quartiles, whiskers: p1–p99)")
        ax.grid(axis="x", alpha=0.3)
    ax.set_title("Latency distribution per artifact")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    front, best = [], -1.0
    for lat, acc in sorted(points):
        if acc > best:
            front.append((lat, acc))
            best = acc
    return front


def plot_pareto(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if _acc(r) is not None and r.get("latency_ms")]
    models = list(dict.fromkeys(str(r.get("model")) for r in pts)) or ["(none)"]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), dpi=110, squeeze=False)
    markers = {"fp32": "o", "fp16": "s", "int8": "^"}
    for ax, model in zip(axes[0], models):
        mine = [r for r in pts if str(r.get("model")) == model]
        if not mine:
            ax.text(0.5, 0.5, "no accuracy measured\n(give --data or --run)", ha="center", va="center")
            ax.set_axis_off()
            continue
        placed: list[tuple[float, float]] = []
        for r in sorted(mine, key=lambda r: (float(_acc(r)), r["latency_ms"]["p50"])):
            x, y = r["latency_ms"]["p50"], _acc(r)
            # neighbours with the same accuracy and a close latency: stagger the labels
            crowd = sum(1 for px, py in placed if py == y and max(px, x) / min(px, x) < 1.6)
            placed.append((x, y))
            dy = 4 - 12 * (crowd % 2) - 6 * (crowd // 2)
            ax.scatter(x, y, s=70, c=TARGET_COLORS.get(str(r.get("target")), "#bbbbbb"),
                       marker=markers.get(str(r.get("precision")), "D"), edgecolors="black", linewidths=0.5, zorder=3)
            ax.annotate(f"{r.get('target')}/{r.get('precision')}" + (f" @{r['device_id']}" if r.get("device_id") else ""),
                        (x, y), xytext=(5, dy), textcoords="offset points", fontsize=8)
        front = _pareto([(r["latency_ms"]["p50"], float(_acc(r))) for r in mine])
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", alpha=0.4,
                    linestyle="--", label="Pareto front")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xscale("log")
        _plain_ticks(ax)
        xs = [r["latency_ms"]["p50"] for r in mine]
        ax.set_xlim(min(xs) / 1.6, max(xs) * 2.5)  # room for the labels
        ax.set_xlabel("p50 latency, ms (log; left is faster)")
        ax.set_ylabel("accuracy (up is better)")
        ax.set_title(f"{model}: accuracy vs latency")
        ax.grid(alpha=0.3)
        ys = [float(_acc(r)) for r in mine]
        pad = max(0.01, (max(ys) - min(ys)) * 0.3)
        ax.set_ylim(min(ys) - pad, min(1.0 + pad / 6, max(ys) + pad))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(paths: Iterable[str | Path], out_dir: Path) -> dict[str, Path]:
    """Read result files, write report.md + latency.png + pareto.png into ``out_dir``."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise BenchError("no results files given")
    runs = [read_run(p) for p in paths]
    rows = rows_with_env(runs)
    if not rows:
        raise BenchError("the results files hold no results")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_latency(rows, out_dir / "latency.png")
    plot_pareto(rows, out_dir / "pareto.png")
    md = out_dir / "report.md"
    atomic_write_text(md, markdown(runs, rows, [str(p) for p in paths]))
    return {"markdown": md, "latency_png": out_dir / "latency.png", "pareto_png": out_dir / "pareto.png"}
