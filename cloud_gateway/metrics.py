"""A tiny Prometheus text-format registry (counters, gauges, histograms with labels).

Why not prometheus_client: one more dependency for ~80 lines, and the gateway
also needs the values in-process for its tests and the dashboard.

**A fleet of thousands.** Series are kept per device in process (`value(..., device=)` answers), but
`render` writes them per model line by default: a ``device`` label becomes ``line`` (the device's model line,
`note_line`; ``unknown`` before its first status) and the devices' counters and histograms are summed, while
per-device gauges are left out (the fleet's gauges come from the store's summary, `cloud_gateway.api`). With
``per_device=True`` (``--metrics-per-device``) every device keeps its own series. Rendering copies the values
under the lock and formats them after releasing it, so a scrape never holds up the threads that count.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Any, Iterable

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

Labels = tuple[tuple[str, str], ...]


def _fmt_labels(labels: Labels, extra: Iterable[tuple[str, str]] = ()) -> str:
    items = list(labels) + list(extra)
    if not items:
        return ""
    esc = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in items)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(items, esc)) + "}"


def _key(labels: dict[str, str]) -> Labels:
    """The series key: labels sorted by name (one label, the common case, needs no sort)."""
    return tuple(labels.items()) if len(labels) < 2 else tuple(sorted(labels.items()))


class Metrics:
    def __init__(self, *, per_device: bool = False) -> None:
        self.per_device = per_device  # render a series per device (else per model line)
        self._lines: dict[str, str] = {}  # device -> its model line (the aggregation's label)
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[Labels, float]] = {}
        self._hists: dict[str, tuple[tuple[float, ...], dict[Labels, list[float]]]] = {}

    def _declare(self, name: str, kind: str, help_: str) -> None:
        if name not in self._help:
            self._help[name] = (kind, help_)

    def inc(self, name: str, help_: str, value: float = 1.0, **labels: str) -> None:
        self._declare(name, "counter", help_)
        key = _key(labels)
        with self._lock:
            d = self._values.setdefault(name, {})
            d[key] = d.get(key, 0.0) + value

    def set(self, name: str, help_: str, value: float, **labels: str) -> None:
        self._declare(name, "gauge", help_)
        with self._lock:
            self._values.setdefault(name, {})[_key(labels)] = float(value)

    def observe(self, name: str, help_: str, value: float, buckets: tuple[float, ...] = LATENCY_BUCKETS,
                **labels: str) -> None:
        self._declare(name, "histogram", help_)
        key = _key(labels)
        with self._lock:
            b, series = self._hists.setdefault(name, (buckets, {}))
            s = series.setdefault(key, [0.0] * (len(b) + 2))  # per-bucket counts, +Inf, sum
            i = bisect.bisect_left(b, value)  # the first bucket whose upper bound is >= value
            s[i] += 1
            s[-1] += value

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get(name, {}).get(_key(labels), 0.0)

    def hist_count(self, name: str, **labels: str) -> int:
        with self._lock:
            b, series = self._hists.get(name, ((), {}))
            s = series.get(_key(labels))
            return int(sum(s[:-1])) if s else 0

    def note_line(self, device: str, line: str | None) -> None:
        """The model line ``device`` reports (its series are summed into that line's); None keeps the known one."""
        if line:
            self._lines[device] = line[:128]

    def _aggregate(self, series: dict[Labels, Any], gauge: bool) -> dict[Labels, Any]:
        """Per-device series summed per model line (gauges of a device: left out)."""
        out: dict[Labels, Any] = {}
        for key, v in series.items():
            if not any(k == "device" for k, _ in key):
                out[key] = v
                continue
            if gauge:
                continue
            labels = dict(key)
            labels["line"] = self._lines.get(labels.pop("device"), "unknown")
            agg = _key(labels)
            if isinstance(v, list):
                prev = out.get(agg)
                out[agg] = list(v) if prev is None else [a + b for a, b in zip(prev, v)]
            else:
                out[agg] = out.get(agg, 0.0) + v
        return out

    def render(self) -> str:
        with self._lock:  # a copy of the numbers; the text is made without the lock
            helps = sorted(self._help.items())
            values = {n: dict(d) for n, d in self._values.items()}
            hists = {n: (b, {k: list(s) for k, s in series.items()}) for n, (b, series) in self._hists.items()}
        lines: list[str] = []
        for name, (kind, help_) in helps:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
            if kind == "histogram":
                b, series = hists.get(name, ((), {}))
                if not self.per_device:
                    series = self._aggregate(series, False)
                for key, s in series.items():
                    cum = 0.0
                    for ub, c in zip(list(b) + [math.inf], s[:-1]):
                        cum += c
                        le = "+Inf" if ub == math.inf else repr(float(ub))
                        lines.append(f"{name}_bucket{_fmt_labels(key, [('le', le)])} {cum:g}")
                    lines.append(f"{name}_sum{_fmt_labels(key)} {s[-1]:.6g}")
                    lines.append(f"{name}_count{_fmt_labels(key)} {cum:g}")
            else:
                plain = values.get(name, {})
                if not self.per_device:
                    plain = self._aggregate(plain, kind == "gauge")
                for key, v in plain.items():
                    lines.append(f"{name}{_fmt_labels(key)} {v:.6g}")
        return "\n".join(lines) + "\n"
