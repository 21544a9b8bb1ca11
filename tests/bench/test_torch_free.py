"""The runner core runs on devices: importing and running it must not load torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_runner_core_imports_no_torch(tiny_bundle: Path) -> None:
    code = (
        "import sys; sys.path.insert(0, '.');"
        "import hw_bench.job, hw_bench.loadgen, hw_bench.bench, hw_bench.envinfo, hw_bench.data, hw_bench.fleet, "
        "hw_bench.results, hw_bench.vendor, hw_bench.local;"
        "from edgecore.bundle import open_bundle;"
        f"hw_bench.job.run_job({{'duration_s': 0.01, 'min_queries': 3, 'accuracy': False}}, open_bundle({str(tiny_bundle)!r}));"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorflow', 'matplotlib'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert r.returncode == 0, r.stdout + r.stderr
