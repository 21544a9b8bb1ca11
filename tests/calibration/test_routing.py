from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

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


def test_student_matching_teacher_on_a_small_split_still_routes(caplog) -> None:
    """27 validation samples, edge and cloud both right everywhere: not 'nothing is ever offloaded'."""
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.4, 1.0, 27)
    ok = np.ones(27, bool)
    with caplog.at_level("WARNING", logger="calibration.routing"):
        ch = choose_threshold(conf, ok, ok, offload_budget=0.10)
    assert ch.rule == "budget_quantile" and ch.threshold > 0
    offloaded = conf < ch.threshold
    assert offloaded.sum() == 2  # floor(0.10 * 27): the budget, spent ...
    assert conf[offloaded].max() < conf[~offloaded].min()  # ... on the least confident inputs
    assert "27-sample" in ch.reason and "edge 100.0%" in ch.reason
    msg = caplog.text
    assert "threshold 0.0" in msg and "offloads 2 of 27" in msg and "budget 10.0%" in msg


def test_tiny_split_offloads_at_least_one_input() -> None:
    conf = np.array([0.9, 0.5, 0.7, 0.95, 0.8])
    ok = np.ones(5, bool)
    ch = choose_threshold(conf, ok, ok, offload_budget=0.10)
    assert ch.rule == "budget_quantile" and np.flatnonzero(conf < ch.threshold).tolist() == [1]


def test_accuracy_rule_when_offloading_helps_has_no_warning(caplog) -> None:
    conf = np.linspace(0.1, 1, 50)
    edge_ok = conf > 0.15
    with caplog.at_level("WARNING", logger="calibration.routing"):
        ch = choose_threshold(conf, edge_ok, np.ones(50, bool), offload_budget=0.2)
    assert ch.rule == "accuracy" and ch.reason == "" and ch.expected_accuracy == 1.0 and not caplog.text


def test_worse_cloud_keeps_routing_off_and_says_so(caplog) -> None:
    conf = np.linspace(0.1, 1, 50)
    with caplog.at_level("WARNING", logger="calibration.routing"):
        ch = choose_threshold(conf, np.ones(50, bool), np.zeros(50, bool), offload_budget=0.5)
    assert ch.rule == "accuracy" and ch.expected_offload == 0.0
    assert "less accurate than the edge" in caplog.text


def test_a_cloud_worse_by_a_margin_chance_explains_still_gets_the_budget(caplog) -> None:
    """On a 180-input calibration split the teacher is wrong on 3 inputs the student gets right and right on 1 it
    gets wrong: a sign test cannot tell that from chance (p=0.62), so the budget is spent (a cloud wrong on 12
    more is significant: routing stays off)."""
    from calibration.routing import sign_test

    conf = np.linspace(0.2, 1.0, 180)
    edge = np.ones(180, bool)
    edge[179] = False  # (its most confident input: offloading the least confident never helps)
    cloud = np.ones(180, bool)
    cloud[[5, 90, 170]] = False
    with caplog.at_level("WARNING", logger="calibration.routing"):
        ch = choose_threshold(conf, edge, cloud, offload_budget=0.1)
    assert ch.rule == "budget_quantile" and ch.expected_offload == pytest.approx(18 / 180)
    assert "by 2 input(s) of 180" in ch.reason and "p=0.62" in ch.reason
    cloud[100:112] = False
    ch = choose_threshold(conf, edge, cloud, offload_budget=0.1)
    assert ch.rule == "accuracy" and ch.expected_offload == 0.0 and "p=0.001" in ch.reason
    assert sign_test(0, 0) == 1.0 and sign_test(3, 1) == pytest.approx(0.625) and sign_test(15, 1) < 0.001
