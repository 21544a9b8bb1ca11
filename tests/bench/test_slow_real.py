"""The acceptance run: 224x224 benchmark models for every available target, real durations.

Slow (minutes): `make test-slow` or `pytest -m slow tests/bench`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hw_bench.loadgen import Settings
from hw_bench.local import run_local
from hw_bench.report import report
from hw_bench.results import write_run

pytestmark = pytest.mark.slow


def test_mobilenet_and_resnet_224_every_target_with_baseline_and_vendor_check(tmp_path: Path) -> None:
    from hw_bench.models import build_bench_models

    built = build_bench_models(out_dir=tmp_path / "models", families=["mobilenet", "resnet"], size=224)
    assert built["bundles"], built["skipped"]
    rows = []
    for fam in ("mobilenet224", "resnet224"):
        bundles = sorted((tmp_path / "models" / fam / "bundles").iterdir())
        run = run_local(bundles=[b for b in bundles if not b.name.startswith(".")],
                        settings=Settings(min_duration_s=3.0, min_queries=50, warmup=5), threads=2, repetitions=3,
                        baselines=[str(tmp_path / "models" / fam / "model.pt")], vendor_seconds=3, vendor_rounds=2)
        write_run(tmp_path / "results.json", run, append=True)
        rows += run["results"]
        for c in run["cross_checks"]:
            assert c["available"] and c["throughput_ratio"] > 0
    assert all(r["queries"] >= 50 for r in rows)
    assert all(r["speedup_vs_pytorch"] is not None for r in rows)
    out = report([tmp_path / "results.json"], tmp_path / "report")
    md = out["markdown"].read_text()
    assert "int8 vs fp32 per runtime" in md and "benchmark_app" in md
