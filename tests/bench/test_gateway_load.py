"""``hw-bench gateway``: a real broker, a real gateway process and the floor responder, end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cloud_gateway.broker import find_mosquitto

pytestmark = pytest.mark.broker


def test_hw_bench_gateway_measures_gateway_and_floor(tiny_cascade, tmp_path):
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    r = subprocess.run([sys.executable, "-m", "hw_bench.cli", "gateway", "--teacher", str(tiny_cascade.teacher_onnx),
                        "--clients", "2", "--inflight", "2", "--seconds", "0.4", "--floor", "--rounds", "2",
                        "--replicas", "2", "--rates", "40", "--json"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "gateway / floor" in r.stdout and out["cpu"]["logical_cores"] >= 1 and len(out["load_average_before"]) == 3
    assert "steal_pct" in out
    for name in ("gateway", "floor"):
        assert out[name]["max_offloads_per_s"] > 0
        assert [lv["load"] for lv in out[name]["levels"]] == [0.5, 0.8, 1.0, None]  # None: the fixed --rates
        assert out[name]["levels"][-1]["rate"] == 40.0
        for lv in out[name]["levels"]:
            assert lv["answered"] > 0 and lv["errors"] == 0 and lv["p50_ms"] <= lv["p95_ms"] <= lv["p99_ms"]
            assert 0 <= lv["lost"] <= lv["sent"] and lv["sent"] >= lv["answered"]  # counted sends (2 rounds)
        assert len(out[name]["rounds"]) == 2 and out[name]["max_offloads_per_s"] == pytest.approx(
            sorted(out[name]["rounds"])[0] / 2 + sorted(out[name]["rounds"])[1] / 2, abs=0.1)  # median of 2
    assert out["rounds"] == 2 and out["replicas"] == 2 and len(out["gateway_vs_floor_rounds"]) == 2
    g = out["goal"]
    assert g["gateway_vs_floor"] == out["gateway_vs_floor"] and g["gateway_vs_floor_min"] == 0.95
    assert g["met"] == (g["gateway_vs_floor"] >= 0.95 and g["gateway_p50_at_half_load_ms"] <= 2.0)
    assert "goal MET" in r.stdout or "goal NOT MET" in r.stdout
    (eq,) = out["at_equal_load"]  # both responders at the same offered load, side by side
    assert eq["rate"] == 40.0 and eq["gateway_p50_ms"] == out["gateway"]["levels"][-1]["p50_ms"]
    assert eq["floor_p50_ms"] == out["floor"]["levels"][-1]["p50_ms"] and "at 40.0/s offered" in r.stdout


@pytest.mark.parametrize("rates", ["0", "fast", "300,-1", ","])
def test_hw_bench_gateway_refuses_rates_that_are_not_positive_numbers(rates):
    r = subprocess.run([sys.executable, "-m", "hw_bench.cli", "gateway", "--teacher", "x.onnx", "--rates", rates],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--rates" in r.stderr and "requests/s" in r.stderr and "Traceback" not in r.stderr


def test_hw_bench_gateway_needs_a_target(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hw_bench.cli", "gateway", "--clients", "1"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--teacher" in r.stderr and "Traceback" not in r.stderr
