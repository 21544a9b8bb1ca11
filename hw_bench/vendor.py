"""Cross-checks against the vendors' own tools on the same artifact and threads.

OpenVINO's ``benchmark_app`` (ships with the openvino wheel) runs the bundle's
IR in the single-stream configuration our runner uses: one stream, one
synchronous request, batch 1, the same thread count. ``trtexec`` is used for
Jetson bundles when it is on PATH. Both report their median latency and
throughput; we print ours beside theirs and the ratio.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgecore.bundle import Bundle
from edgecore.errors import BenchError

_MEDIAN = re.compile(r"Median:\s+([\d.]+)\s*(us|ms)")
_TPUT = re.compile(r"Throughput:\s+([\d.]+)\s*FPS")


def find_tool(name: str) -> str | None:
    """The tool beside this interpreter (the venv's bin) or on PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def benchmark_app_command(bundle: Bundle, *, threads: int | None, seconds: float, exe: str) -> list[str]:
    main = bundle.root / bundle.manifest.artifact.main
    spec = bundle.input_spec
    shape = ",".join(str(s) for s in (1, *spec.sample_shape))
    # -data_shape keeps the IR's dynamic batch, as our runner loads it (-shape would make it
    # static); -infer_precision f32 as our runner asks (benchmark_app's default is bf16 on
    # CPUs with AVX512_BF16/AMX, which would compare different arithmetic).
    cmd = [exe, "-m", str(main), "-d", "CPU", "-api", "sync", "-nireq", "1", "-b", "1",
           "-t", str(max(1, int(round(seconds)))), "-data_shape", f"{spec.name}[{shape}]",
           "-infer_precision", "f32"]
    if threads:
        # benchmark_app accepts -nthreads only with -hint none; one stream = the latency hint's layout
        cmd += ["-hint", "none", "-nstreams", "1", "-nthreads", str(threads)]
    else:
        cmd += ["-hint", "latency"]
    return cmd


def parse_benchmark_app(out: str) -> dict[str, float]:
    m, t = _MEDIAN.search(out), _TPUT.search(out)
    if not m or not t:
        raise BenchError("benchmark_app printed no median latency/throughput:\n" + out[-800:])
    median = float(m.group(1)) / (1000.0 if m.group(2) == "us" else 1.0)
    return {"median_ms": median, "throughput_sps": float(t.group(1))}


def run_benchmark_app(bundle: Bundle, *, threads: int | None, seconds: float = 5.0) -> dict[str, Any]:
    """Run benchmark_app on an OpenVINO bundle's IR; returns its figures and command."""
    if bundle.target != "openvino":
        raise BenchError(f"benchmark_app cross-check needs an openvino bundle, not {bundle.target!r}")
    exe = find_tool("benchmark_app")
    if exe is None:
        return {"tool": "benchmark_app", "available": False, "reason": "benchmark_app not found (pip install openvino)"}
    cmd = benchmark_app_command(bundle, threads=threads, seconds=seconds, exe=exe)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"benchmark_app did not finish: {' '.join(cmd)}") from e
    if p.returncode != 0:
        raise BenchError(f"benchmark_app failed ({p.returncode}): {(p.stdout + p.stderr)[-800:]}")
    return {"tool": "benchmark_app", "available": True, "command": cmd, **parse_benchmark_app(p.stdout)}


def trtexec_status() -> dict[str, Any]:
    exe = find_tool("trtexec")
    if exe is None:
        return {"tool": "trtexec", "available": False,
                "reason": "trtexec not found (it ships with TensorRT on an NVIDIA GPU machine)"}
    return {"tool": "trtexec", "available": True, "path": exe}


def cross_check_openvino(bundle: Bundle, run: Any, samples: Any, *, threads: int | None, seconds: float,
                         rounds: int = 3) -> dict[str, Any]:
    """Alternate benchmark_app and our runner on the same IR, ``rounds`` times each.

    Alternating rounds of equal length keep a shared machine's load drift out
    of the ratio; the figures are medians over rounds.
    """
    import numpy as np

    from .loadgen import Settings, single_stream

    ours_ms, ours_tp, theirs_ms, theirs_tp = [], [], [], []
    first: dict[str, Any] = {}
    for _ in range(max(1, rounds)):
        v = run_benchmark_app(bundle, threads=threads, seconds=seconds)
        if not v.get("available"):
            return v
        first = first or v
        theirs_ms.append(v["median_ms"])
        theirs_tp.append(v["throughput_sps"])
        r = single_stream(run, samples, Settings(min_duration_s=max(1.0, round(seconds)), min_queries=10, warmup=10))
        ours_ms.append(r.percentiles()["p50"])
        ours_tp.append(r.throughput)
    med = lambda xs: float(np.median(xs))  # noqa: E731
    lat_ratios = [a / b for a, b in zip(ours_ms, theirs_ms)]
    tp_ratios = [a / b for a, b in zip(ours_tp, theirs_tp)]
    return {
        "tool": "benchmark_app", "available": True, "command": first["command"], "rounds": len(ours_ms),
        "median_ms": med(theirs_ms), "throughput_sps": med(theirs_tp),
        "ours_median_ms": med(ours_ms), "ours_throughput_sps": med(ours_tp),
        "latency_ratio": med(lat_ratios), "throughput_ratio": med(tp_ratios),
        "rounds_ms": {"ours": ours_ms, "tool": theirs_ms},
    }
