from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from calibration.drift_reference import drift_reference
from calibration.routing import choose_threshold, routing_curve, write_curve


def test_curve_endpoints_and_threshold_for_budget(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 1000
    conf = rng.random(n)
    edge_ok = rng.random(n) < conf  # low confidence -> often wrong
    cloud_ok = rng.random(n) < 0.97
    off, acc, thr = routing_curve(conf, edge_ok, cloud_ok)
    assert off[0] == 0 and off[-1] == 1
    assert acc[0] == edge_ok.mean() and acc[-1] == cloud_ok.mean()
    ch = choose_threshold(conf, edge_ok, cloud_ok, offload_budget=0.10)
    assert ch.expected_offload <= 0.10 + 1e-9
    assert ch.expected_accuracy > ch.edge_accuracy  # offloading the least confident helps
    assert ch.expected_offload == np.mean(conf < ch.threshold)
    # the chosen point is the best one within the budget
    assert ch.expected_accuracy >= acc[off <= 0.10].max() - 1e-12
    j, png = write_curve(tmp_path, conf, edge_ok, cloud_ok, choice=ch)
    data = json.loads((tmp_path / j).read_text())
    assert len(data["offload"]) == len(data["accuracy"]) == len(data["threshold"]) <= 201
    assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_zero_budget_offloads_nothing() -> None:
    conf = np.array([0.2, 0.5, 0.9])
    ch = choose_threshold(conf, np.array([False, True, True]), np.array([True, True, True]), offload_budget=0.0)
    assert ch.threshold == 0.0 and ch.expected_offload == 0.0


def test_useless_cloud_is_never_used() -> None:
    conf = np.linspace(0.1, 1, 50)
    ch = choose_threshold(conf, np.ones(50, bool), np.zeros(50, bool), offload_budget=0.5)
    assert ch.expected_offload == 0.0


def test_drift_reference_matches_the_agent_contract() -> None:
    from device_agent.drift import psi

    rng = np.random.default_rng(0)
    raw = rng.random((300, 1, 8, 8)).astype(np.float32) * 16
    conf = rng.random(300)
    ref = drift_reference(raw=raw, conf=conf, measure="max_prob", temperature=1.3)
    assert ref["schema_version"] == 1 and ref["n"] == 300 and ref["temperature"] == 1.3
    for block in (ref["confidence"], ref["features"]["mean"], ref["features"]["std"]):
        assert len(block["edges"]) == len(block["counts"]) + 1 and sum(block["counts"]) == 300
        assert len(block["sample"]) == 300
    same = raw.reshape(300, -1).mean(axis=1)
    assert psi(np.array(ref["features"]["mean"]["counts"]), np.array(ref["features"]["mean"]["edges"]), same) < 0.01
    shifted = same + 3.0
    assert psi(np.array(ref["features"]["mean"]["counts"]), np.array(ref["features"]["mean"]["edges"]), shifted) > 0.25
