from __future__ import annotations

import time

import numpy as np
import pytest

from edgecore.errors import BenchError
from hw_bench.loadgen import Scenario, Settings, offline, single_stream


class Counter:
    def __init__(self, max_batch: int | None = None, sleep: float = 0.0) -> None:
        self.calls = 0
        self.shapes: list[tuple[int, ...]] = []
        self.max_batch = max_batch
        self.sleep = sleep

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.max_batch is not None and batch.shape[0] > self.max_batch:
            raise ValueError(f"fixed batch {self.max_batch}")
        self.calls += 1
        self.shapes.append(batch.shape)
        if self.sleep:
            time.sleep(self.sleep)
        return np.zeros((batch.shape[0], 10), np.float32)


X = np.random.default_rng(0).standard_normal((20, 3)).astype(np.float32)


def test_single_stream_meets_query_minimum_and_excludes_warmup() -> None:
    run = Counter()
    s = Settings(min_duration_s=0.0, min_queries=57, warmup=5)
    r = single_stream(run, X, s)
    assert r.queries == 57 and r.latencies_ms.size == 57
    assert run.calls == 57 + 5  # warm-up ran but was not timed
    assert all(sh == (1, 3) for sh in run.shapes)
    p = r.percentiles()
    assert p["min"] <= p["p50"] <= p["p90"] <= p["p95"] <= p["p99"] <= p["max"]


def test_single_stream_meets_duration_minimum() -> None:
    run = Counter(sleep=0.002)
    r = single_stream(run, X, Settings(min_duration_s=0.15, min_queries=1, warmup=0))
    assert r.duration_s >= 0.15
    assert r.queries > 1
    assert r.throughput == pytest.approx(r.queries / r.duration_s)


def test_offline_skips_refused_batch_sizes_and_reports_best() -> None:
    run = Counter(max_batch=4)
    r = offline(run, X, Settings(scenario=Scenario.OFFLINE, min_duration_s=0.05, min_queries=40, warmup=2, batch_sizes=(1, 4, 16)))
    assert set(r.batch_search) == {1, 4}
    assert 16 in r.batch_skipped and "fixed batch 4" in r.batch_skipped[16]
    assert r.batch_size in (1, 4)
    assert r.samples == r.queries * r.batch_size and r.samples >= 40
    d = r.to_dict()
    assert d["scenario"] == "offline" and d["throughput_sps"] > 0


def test_offline_fails_clearly_when_every_batch_is_refused() -> None:
    def broken(batch: np.ndarray) -> None:
        raise RuntimeError("no")

    with pytest.raises(BenchError, match="refused every batch size"):
        offline(broken, X, Settings(scenario=Scenario.OFFLINE, min_duration_s=0.01, batch_sizes=(2,)))


@pytest.mark.parametrize("kw", [{"min_queries": 0}, {"warmup": -1}, {"batch_sizes": ()}, {"min_duration_s": -1}])
def test_bad_settings_are_refused(kw: dict) -> None:
    with pytest.raises(BenchError):
        Settings(**kw)
