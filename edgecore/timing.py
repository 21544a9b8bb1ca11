"""The timed loop every latency figure comes from (hw-bench's scenarios, the latency-budget search).

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
