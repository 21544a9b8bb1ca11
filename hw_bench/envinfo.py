"""The environment a result was measured in, recorded next to every number.

CPU model, core counts and the instruction-set flags that decide int8 speed
(AVX2, AVX-512, VNNI, AMX), threads, Python, host and date. Torch-free.
`StealMeter` measures the share of CPU time a hypervisor took from this
machine while a benchmark ran (Linux "steal"): on a shared VM that number,
not the load average, says whether the timings can be trusted.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
from functools import lru_cache
from typing import Any

#: flags that explain int8 vs fp32 speed on x86 (VNNI = int8 dot products in one instruction)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "neon", "asimddp")


def _proc_cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k and k not in info:
                    info[k] = v.strip()
    except OSError:
        pass
    return info


@lru_cache(maxsize=1)
def cpu_record() -> dict[str, Any]:
    """Model name, logical/physical cores and ISA flags (py-cpuinfo if installed, else /proc)."""
    model = ""
    flags: set[str] = set()
    try:
        import cpuinfo  # py-cpuinfo, the `bench` extra

        ci = cpuinfo.get_cpu_info()
        model = str(ci.get("brand_raw") or "")
        flags = set(ci.get("flags") or ())
    except Exception:  # absent or unreadable: fall back to /proc
        pass
    proc = _proc_cpuinfo()
    model = model or proc.get("model name") or proc.get("Hardware") or platform.processor() or "unknown"
    if not flags:
        flags = set((proc.get("flags") or proc.get("Features") or "").split())
    physical = None
    try:
        with open("/proc/cpuinfo") as f:
            pairs = set()
            phys = core = None
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k == "physical id":
                    phys = v.strip()
                elif k == "core id":
                    core = v.strip()
                elif not k:
                    if core is not None:
                        pairs.add((phys, core))
                    phys = core = None
            if core is not None:
                pairs.add((phys, core))
            physical = len(pairs) or None
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "model": model,
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "usable_cores": usable,
        "isa": {f: (f in flags) for f in ISA_FLAGS},
    }


#: above this share of stolen CPU time a run's timings get a warning note
STEAL_WARN_PCT = 5.0


def _cpu_ticks(path: str = "/proc/stat") -> list[int] | None:
    """The aggregate ``cpu`` line of /proc/stat (user nice system idle iowait irq softirq steal ...), or None."""
    try:
        with open(path) as f:
            first = f.readline().split()
    except OSError:
        return None
    if len(first) < 9 or first[0] != "cpu":
        return None
    try:
        return [int(v) for v in first[1:9]]
    except ValueError:
        return None


class StealMeter:
    """The share (%) of this machine's CPU time that the hypervisor ran something else ("steal") between the
    meter's creation and `share()`. None where the kernel does not count it (not Linux) or no time passed."""

    def __init__(self, path: str = "/proc/stat") -> None:
        self._path = path
        self._start = _cpu_ticks(path)

    def share(self) -> float | None:
        end = _cpu_ticks(self._path)
        if self._start is None or end is None:
            return None
        delta = [b - a for a, b in zip(self._start, end, strict=True)]
        total = sum(delta)
        return round(100.0 * delta[7] / total, 1) if total > 0 else None


def steal_note(pct: float | None) -> str | None:
    """A warning when the hypervisor took enough CPU time for the timings to be unreliable, else None."""
    if pct is None or pct < STEAL_WARN_PCT:
        return None
    return (f"the hypervisor took {pct:.0f}% of this machine's CPU time while it measured (steal): threads waited "
            f"on descheduled cores, so times and ratios are unreliable; rerun when the host is quieter")


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (2 decimals), or None where the platform has none (Windows)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(*, threads: int | None = None) -> dict[str, Any]:
    """The record written once per run file (per device for fleet runs).

    The load average says how shared the machine was while it measured.
    """
    return {
        "load_avg": load_average(),
        "cpu": cpu_record(),
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def int8_hint(cpu: dict[str, Any]) -> str:
    """One sentence on what int8 can gain on this CPU, from its flags."""
    isa = cpu.get("isa", {})
    if isa.get("amx_int8"):
        return "AMX-INT8 present: int8 matrix tiles, large int8 speed-ups expected"
    if isa.get("avx512_vnni") or isa.get("avx_vnni"):
        return "VNNI present: int8 dot products fuse multiply+add (vpdpbusd), int8 can beat fp32"
    if isa.get("avx2"):
        return ("AVX2 without VNNI: int8 needs vpmaddubsw+vpmaddwd+vpaddd (3 instructions, "
                "saturating), so int8 gains little over fp32 FMA")
    return "no AVX2: int8 kernels fall back to slow paths"
