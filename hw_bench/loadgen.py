"""LoadGen-style scenarios over one ``run(batch) -> logits`` callable.

Modelled on MLPerf LoadGen: warm-up queries are not timed; a run lasts until
*both* the minimum duration and the minimum query count are met; inputs are
preprocessed and batched before the timed region, so only the runtime call is
measured. Torch-free (numpy + the standard library).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from edgecore.errors import BenchError
from edgecore.timing import timed_frames as _timed_frames
from edgecore.timing import timed_loop as _timed_loop

RunFn = Callable[[np.ndarray], Any]
#: kept in results for plots; the percentiles use every latency.
MAX_KEPT_LATENCIES = 2000


class Scenario(str, enum.Enum):
    SINGLE_STREAM = "single-stream"
    OFFLINE = "offline"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Settings:
    """How long and how hard to run. Defaults are LoadGen's spirit at laptop scale."""

    scenario: Scenario = Scenario.SINGLE_STREAM
    min_duration_s: float = 2.0
    min_queries: int = 100
    warmup: int = 10
    #: offline: batch sizes tried (those the artifact refuses are skipped, with the reason)
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    #: hard stop, so a very slow artifact cannot hold a fleet job forever
    max_duration_s: float = 600.0

    def __post_init__(self) -> None:
        if self.min_duration_s < 0 or self.min_queries < 1 or self.warmup < 0:
            raise BenchError(
                f"bad bench settings: duration {self.min_duration_s} s, min queries {self.min_queries}, "
                f"warmup {self.warmup} (need duration >= 0, queries >= 1, warmup >= 0)"
            )
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise BenchError(f"bad batch sizes {self.batch_sizes!r}: need at least one size >= 1")

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario.value,
            "min_duration_s": self.min_duration_s,
            "min_queries": self.min_queries,
            "warmup": self.warmup,
            "batch_sizes": list(self.batch_sizes),
            "max_duration_s": self.max_duration_s,
        }


@dataclass(frozen=True)
class PostStep:
    """The step each query's output goes through after the runtime call (a task's `postprocess`: a detector's
    decode + NMS), timed apart on the same outputs; ``name`` heads its column."""

    name: str
    fn: Callable[[Any], Any]


def percentiles(lat: np.ndarray) -> dict[str, float]:
    p = np.percentile(lat, [50, 90, 95, 99])
    return {"p50": float(p[0]), "p90": float(p[1]), "p95": float(p[2]), "p99": float(p[3]),
            "mean": float(lat.mean()), "min": float(lat.min()), "max": float(lat.max())}


def _kept(lat: np.ndarray) -> list[float]:
    kept = lat if lat.size <= MAX_KEPT_LATENCIES else lat[:: int(np.ceil(lat.size / MAX_KEPT_LATENCIES))]
    return [round(float(v), 4) for v in kept]


@dataclass
class ScenarioResult:
    """What one scenario run measured. Latencies are per query (one batch)."""

    scenario: Scenario
    batch_size: int
    queries: int
    samples: int
    duration_s: float
    latencies_ms: np.ndarray
    batch_search: dict[int, float] = field(default_factory=dict)  # offline: batch -> samples/s
    batch_skipped: dict[int, str] = field(default_factory=dict)  # offline: batch -> why
    #: per query, the `PostStep` after the runtime call (ms; ``latencies_ms`` stays the runtime call alone)
    post_ms: np.ndarray | None = None
    post_name: str | None = None

    @property
    def throughput(self) -> float:
        """Samples per second over the timed region."""
        return self.samples / self.duration_s if self.duration_s > 0 else float("nan")

    def percentiles(self) -> dict[str, float]:
        return percentiles(self.latencies_ms)

    def post_share(self) -> float | None:
        """The post step's share of a frame: its p50 over the p50 of (runtime + post step) per query."""
        if self.post_ms is None:
            return None
        return float(np.median(self.post_ms) / np.median(self.latencies_ms + self.post_ms))

    def postprocess(self) -> dict[str, Any] | None:
        """The post step's figures: its latencies, the frame's (runtime + post step, per query) and its share."""
        if self.post_ms is None:
            return None
        frame = self.latencies_ms + self.post_ms
        return {"name": self.post_name, "latency_ms": percentiles(self.post_ms), "frame_ms": percentiles(frame),
                "share": self.post_share(), "frame_latencies_ms": _kept(frame)}

    def to_dict(self) -> dict[str, Any]:
        out = {
            "scenario": self.scenario.value,
            "batch_size": self.batch_size,
            "queries": self.queries,
            "samples": self.samples,
            "duration_s": round(self.duration_s, 6),
            "throughput_sps": self.throughput,
            "latency_ms": self.percentiles(),
            "latencies_ms": _kept(self.latencies_ms),
            "batch_search": {str(k): v for k, v in self.batch_search.items()},
            "batch_skipped": {str(k): v for k, v in self.batch_skipped.items()},
        }
        post = self.postprocess()
        if post is not None:
            out["postprocess"] = post
        return out


def make_batches(samples: np.ndarray, batch_size: int, *, count: int = 16) -> list[np.ndarray]:
    """Up to ``count`` distinct contiguous batches cycling through ``samples`` (outside timing)."""
    if samples.ndim < 1 or samples.shape[0] == 0:
        raise BenchError("no input samples to benchmark with")
    n = samples.shape[0]
    out = []
    for i in range(max(1, min(count, int(np.ceil(n / batch_size)) or 1))):
        idx = (np.arange(batch_size) + i * batch_size) % n
        out.append(np.ascontiguousarray(samples[idx]))
    return out


def _timed(run: RunFn, batches: list[np.ndarray], post: PostStep | None, *, min_s: float, min_q: int, max_s: float,
           warmup: int) -> tuple[np.ndarray, np.ndarray | None, float]:
    """(runtime ms, post step ms or None, seconds): `timed_frames` with a post step, else `timed_loop`. The
    seconds leave the post step out, so the throughput stays the runtime's, comparable with a row without one."""
    if post is None:
        lat, dur = _timed_loop(run, batches, min_s=min_s, min_q=min_q, max_s=max_s, warmup=warmup)
        return lat, None, dur
    lat, post_ms, dur = _timed_frames(run, post.fn, batches, min_s=min_s, min_q=min_q, max_s=max_s, warmup=warmup)
    return lat, post_ms, dur - float(post_ms.sum()) / 1e3


def single_stream(run: RunFn, samples: np.ndarray, settings: Settings, post: PostStep | None = None) -> ScenarioResult:
    """One query (batch of 1) at a time, the next issued when the last returns; with ``post``, each query's
    output then goes through it (timed apart: a frame is both)."""
    batches = make_batches(samples, 1)
    lat, post_ms, dur = _timed(
        run, batches, post, min_s=settings.min_duration_s, min_q=settings.min_queries,
        max_s=settings.max_duration_s, warmup=settings.warmup,
    )
    return ScenarioResult(Scenario.SINGLE_STREAM, 1, lat.size, lat.size, dur, lat, post_ms=post_ms,
                          post_name=post.name if post else None)


def offline(run: RunFn, samples: np.ndarray, settings: Settings, post: PostStep | None = None) -> ScenarioResult:
    """Throughput at the best batch size.

    A short trial per batch size (a quarter of the duration each) picks the
    best; the best is then measured for the full duration and query count
    (queries counted in samples, as LoadGen's offline sample count). ``post``
    is timed on each batch's output in that last measurement (the throughput
    stays the runtime's).
    """
    search: dict[int, float] = {}
    skipped: dict[int, str] = {}
    trial_s = max(settings.min_duration_s / 4, 0.05)
    for b in sorted(set(settings.batch_sizes)):
        batches = make_batches(samples, b, count=4)
        try:
            run(batches[0])
        except Exception as e:  # the artifact has a fixed batch or refuses this size
            skipped[b] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            continue
        lat, dur = _timed_loop(run, batches, min_s=trial_s, min_q=2, max_s=settings.max_duration_s, warmup=max(1, settings.warmup // b))
        search[b] = lat.size * b / dur
    if not search:
        raise BenchError(f"offline: the artifact refused every batch size: {skipped}")
    best = max(search, key=lambda k: search[k])
    batches = make_batches(samples, best, count=4)
    min_q = max(1, int(np.ceil(settings.min_queries / best)))
    lat, post_ms, dur = _timed(
        run, batches, post, min_s=settings.min_duration_s, min_q=min_q,
        max_s=settings.max_duration_s, warmup=max(1, settings.warmup // best),
    )
    return ScenarioResult(Scenario.OFFLINE, best, lat.size, lat.size * best, dur, lat, search, skipped,
                          post_ms=post_ms, post_name=post.name if post else None)
