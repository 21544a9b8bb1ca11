"""The timed loop every latency figure comes from (hw-bench's scenarios, the latency-budget search), and its
per-frame variant (`timed_frames`: the runtime call and the step after it, such as a detector's decode, timed
apart on the same frames).

Warm-up calls are not timed; the loop runs until *both* ``min_s`` seconds and
``min_q`` queries are reached (or ``max_s`` seconds pass), timing each call with
``perf_counter_ns``. Inputs are prepared by the caller, outside the timed region.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np


def timed_loop(run: Callable[[np.ndarray], Any], batches: Sequence[np.ndarray], *, min_s: float, min_q: int,
               max_s: float, warmup: int) -> tuple[np.ndarray, float]:
    """(latencies in ms, wall seconds of the timed part)."""
    for i in range(warmup):
        run(batches[i % len(batches)])
    return _loop(run, batches, min_s=min_s, min_q=min_q, max_s=max_s)


def timed_frames(run: Callable[[np.ndarray], Any], post: Callable[[Any], Any], batches: Sequence[np.ndarray], *,
                 min_s: float, min_q: int, max_s: float, warmup: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Like `timed_loop`, each query followed by ``post(output)`` (a detector's decode + NMS) on that query's own
    output, timed apart: (runtime latencies in ms, ``post`` latencies in ms, wall seconds of the timed part).
    A frame costs the sum of the two; the warm-up runs both."""
    for i in range(warmup):
        post(run(batches[i % len(batches)]))
    run_ns: list[int] = []
    post_ns: list[int] = []
    clock = time.perf_counter_ns

    def frame(batch: np.ndarray) -> None:
        t0 = clock()
        out = run(batch)
        t1 = clock()
        post(out)
        post_ns.append(clock() - t1)
        run_ns.append(t1 - t0)

    _, dur = _loop(frame, batches, min_s=min_s, min_q=min_q, max_s=max_s)
    return np.asarray(run_ns, dtype=np.float64) / 1e6, np.asarray(post_ns, dtype=np.float64) / 1e6, dur


def _loop(run: Callable[[np.ndarray], Any], batches: Sequence[np.ndarray], *, min_s: float, min_q: int,
          max_s: float) -> tuple[np.ndarray, float]:
    lat: list[int] = []
    nb = len(batches)
    clock = time.perf_counter_ns
    min_ns, max_ns = int(min_s * 1e9), int(max_s * 1e9)
    start = clock()
    q = 0
    while True:
        t0 = clock()
        run(batches[q % nb])
        t1 = clock()
        lat.append(t1 - t0)
        q += 1
        elapsed = t1 - start
        if (q >= min_q and elapsed >= min_ns) or elapsed >= max_ns:
            break
    return np.asarray(lat, dtype=np.float64) / 1e6, (clock() - start) / 1e9
