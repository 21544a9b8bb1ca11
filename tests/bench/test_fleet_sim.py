"""``hw-bench fleet-sim``: simulated devices over a few connections against a real broker and gateway process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cloud_gateway.broker import find_mosquitto

pytestmark = pytest.mark.broker


def _sim(tiny_cascade, *extra: str) -> dict:  # type: ignore[no-untyped-def]
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    r = subprocess.run([sys.executable, "-m", "hw_bench.cli", "fleet-sim", "--teacher", str(tiny_cascade.teacher_onnx),
                        "--devices", "60", "--period", "1", "--seconds", "3", "--connections", "3", "--drain", "15",
                        *extra, "--json"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_fleet_sim_reports_every_window_stored_and_the_gateways_cost(tiny_cascade):
    out = _sim(tiny_cascade)
    assert out["offered"] >= 150 and out["stored"] == out["offered"] == out["acknowledged"] and out["lost"] == 0
    assert out["statuses_stored"] == 60 and out["store_rate_per_s"] > 0
    assert out["gateway_cpu_pct"] > 0 and out["gateway_rss_peak_mb"] > 10
    assert out["api_ms"]["dashboard"]["n"] >= 1 and out["cpu_model"] and len(out["load_average_after"]) == 3


def test_fleet_sim_counts_what_the_gateway_did_not_store(tiny_cascade):
    """The sibling: a gateway listening under another prefix stores nothing, and the report says all was lost."""
    out = _sim(tiny_cascade, "--gateway-arg=--prefix=elsewhere", "--drain", "2")
    assert out["offered"] >= 150 and out["stored"] == 0 == out["acknowledged"] and out["lost"] == out["offered"]
    assert out["lost_share"] == 1.0 and out["statuses_stored"] == 0
