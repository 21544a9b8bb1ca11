"""``toolchain refresh``: collected samples -> a gated, provenance-carrying new run (tiny models)."""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from edgecore.samples import Sample, SamplePage
from tests.fixtures.pipeline import tiny_config
from toolchain.config import to_toml
from toolchain.refresh import RefreshError, refresh
from toolchain.refresh.fetch import load_samples
from toolchain.refresh.gates import paired_difference
from toolchain.refresh.redistill import soup
from toolchain.refresh.refresh_set import build_refresh_set
from toolchain.rundir import RunDir


def _drifted(x: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.rot90(x, k=1, axes=(-2, -1)) + rng.normal(0, 2.0, size=x.shape)
    return np.clip(out, 0, 16).astype(np.float32)


def _parent(tiny_run, tmp_path, **refresh_cfg):
    parent = tmp_path / "parent"
    shutil.copytree(tiny_run, parent)
    cfg = tiny_config(parent, refresh={"epochs": 4, "lr": 0.003, "max_regression_pt": 15.0, "min_samples": 10,
                                       **refresh_cfg})
    (parent / "config.toml").write_text(to_toml(cfg))
    return parent


def _samples(run: RunDir, n: int, *, human: bool = True) -> list[Sample]:
    """Drifted training inputs as a gateway would store them: preprocessed, with teacher probabilities."""
    x_raw, y = run.splits().train
    spec = run.input_spec
    x = spec.preprocess(_drifted(x_raw[:n]))
    probs = np.full((n, 10), 0.02, np.float32)
    probs[np.arange(n), y[:n]] = 0.82
    return [Sample(id=i + 1, device="edge-3", received=1e9 + i, input=x[i][None], teacher_probs=probs[i],
                   human_label=int(y[i]) if human else None, confidence=0.3, drift=True) for i in range(n)]


def test_refresh_set_dedupes_holds_out_balances_and_refuses_foreign_shapes(tiny_run):
    run = RunDir(tiny_run)
    ss = _samples(run, 40)
    dup = Sample(id=99, device="edge-3", received=2e9, input=ss[0].input, teacher_probs=ss[0].teacher_probs)
    rs = build_refresh_set(ss + [dup], run.input_spec, 10, holdout=0.25, seed=0, balance="oversample", min_samples=10)
    assert rs.duplicates == 1 and len(rs.ids_holdout) == 10 and len(rs.ids_train) == 30
    assert not set(rs.ids_train) & set(rs.ids_holdout)
    counts = np.bincount(rs.y_train, minlength=10)
    assert counts[counts > 0].min() == counts.max()  # balanced by oversampling
    # raw values back: preprocess(raw) gives what the device sent
    x0 = next(s for s in ss if s.id == rs.ids_holdout[0]).input[0]
    np.testing.assert_allclose(run.input_spec.preprocess(rs.x_val[:1])[0], x0, atol=1e-4)
    bad = Sample(id=7, device="d", received=1.0, input=np.zeros((1, 1, 4, 4), np.float32), teacher_probs=ss[0].teacher_probs)
    with pytest.raises(RefreshError, match=r"sample 7 from d: input shape \[1, 1, 4, 4\] does not match"):
        build_refresh_set(ss + [bad], run.input_spec, 10, holdout=0.25, seed=0, balance="oversample", min_samples=10)
    with pytest.raises(RefreshError, match="refresh.min_samples is 10"):
        build_refresh_set(ss[:5], run.input_spec, 10, holdout=0.25, seed=0, balance="oversample", min_samples=10)


def test_refresh_set_evens_out_classes_by_oversampling_or_by_weight(tiny_run):
    run = RunDir(tiny_run)
    ss = _samples(run, 160)
    skewed = [s for i, s in enumerate(ss) if s.label == 1 or i % 4 == 0]  # every "1", a quarter of the rest
    kw = dict(holdout=0.25, seed=0, min_samples=10)
    rs = build_refresh_set(skewed, run.input_spec, 10, balance="weight", **kw)
    assert len(rs.y_train) == len(rs.ids_train) == len(rs.w_train)  # nothing drawn twice: the part keeps its size
    totals = np.bincount(rs.y_train, weights=rs.w_train, minlength=10)
    present = np.bincount(rs.y_train, minlength=10) > 0
    np.testing.assert_allclose(totals[present], totals[present].mean(), rtol=1e-5)  # every class weighs the same
    assert rs.w_train.mean() == pytest.approx(1.0)
    ones = rs.y_train == 1
    assert ones.mean() > 0.2 and rs.w_train[ones].max() < rs.w_train[~ones].min()  # the common class weighs less
    over = build_refresh_set(skewed, run.input_spec, 10, balance="oversample", **kw)
    counts = np.bincount(over.y_train, minlength=10)
    assert counts[counts > 0].min() == counts.max() > np.bincount(rs.y_train).max() - 1
    assert len(over.y_train) > len(over.ids_train) and (over.w_train == 1).all()
    assert over.ids_train == rs.ids_train and over.ids_holdout == rs.ids_holdout  # the same split either way
    plain = build_refresh_set(skewed, run.input_spec, 10, balance="none", **kw)
    assert len(plain.y_train) == len(plain.ids_train) and (plain.w_train == 1).all()
    with pytest.raises(ValueError):
        build_refresh_set(skewed, run.input_spec, 10, balance="sometimes", **kw)


def _serve_pages(samples: list[Sample], token: str):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.headers.get("Authorization") != f"Bearer {token}":
                self.send_response(401)
                self.end_headers()
                return
            from urllib.parse import parse_qs, urlparse

            q = parse_qs(urlparse(self.path).query)
            after, limit = int(q["after"][0]), int(q["limit"][0])
            page = [s for s in samples if s.id > after][:limit]
            body = json.dumps(SamplePage(page, page[-1].id if len(page) == limit else None).to_json()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_samples_come_from_http_pages_or_the_gateway_database(tiny_run, tmp_path):
    from cloud_gateway.store import GatewayStore
    from edgecore import wire

    ss = _samples(RunDir(tiny_run), 23)
    srv = _serve_pages(ss, "tok")
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        got = load_samples(url, token="tok", page_size=10)
        assert [s.id for s in got] == [s.id for s in ss]
        with pytest.raises(RefreshError, match="HTTP 401.*token"):
            load_samples(url, token="wrong")
    finally:
        srv.shutdown()
    store = GatewayStore(tmp_path / "gw.sqlite")
    store.samples.add([{"device_id": s.device, "bundle": "v1", "received": s.received,
                        "input": wire.encode_tensor(s.input),
                        "teacher_probs": wire.encode_tensor(s.teacher_probs), "teacher_label": s.teacher_label,
                        "uncertainty": s.uncertainty, "confidence": s.confidence, "drift": True, "flagged": False,
                        "human_label": s.human_label} for s in ss])
    db = load_samples(str(tmp_path / "gw.sqlite"), device="edge-3")
    assert len(db) == 23 and db[0].human_label == ss[0].human_label and db[0].bundle == "v1"
    with pytest.raises(RefreshError, match="no gateway database"):
        load_samples(str(tmp_path / "missing.sqlite"))
    with pytest.raises(RefreshError, match="cannot reach gateway"):
        load_samples("http://127.0.0.1:9/")


def test_refresh_learns_the_shifted_inputs_keeps_the_original_and_records_provenance(tiny_run, tmp_path):
    parent = _parent(tiny_run, tmp_path)
    run = RunDir(parent)
    ss = _samples(run, 300)
    srv = _serve_pages(ss, "tok")
    try:
        rep = refresh(parent=parent, out=tmp_path / "new", source=f"http://127.0.0.1:{srv.server_address[1]}",
                      token="tok", targets=["onnx-fp32"], show=False)
    finally:
        srv.shutdown()
    orig, held = rep["gates"]
    assert rep["passed"] and orig["ok"] and held["ok"], rep["gates"]
    pr = orig["paired"]  # the same two models, input by input: the same points lost as the accuracies say
    assert pr["inputs"] == len(run.splits().test[1]) and pr["lost_pt"] == pytest.approx(orig["lost_pt"], abs=0.01)
    assert pr["lost_pt_ci95"][0] <= pr["lost_pt"] <= pr["lost_pt_ci95"][1]
    assert held["after"] > held["before"] + 0.2  # the refreshed student reads rotated digits; the parent cannot
    assert "3 averaged" in rep["stages"][0]["stage"]  # refresh.candidates (default 3): one model soup
    # refresh.strategy "expert" (default): the student kept, the soup as an expert beside it, a gate between them
    assert rep["strategy"] == "expert" and "student kept + expert" in rep["stages"][0]["stage"]
    gate = rep["gate"]
    assert gate["original_val_to_student"] > 0.9 and gate["held_out_to_expert"] > 0.9, gate
    assert gate["growth"]["params_after"] > 2 * gate["growth"]["params_before"]  # the price, reported
    # the kept student's quantized program ships as it was: where the gate picks it, the new program answers as the
    # parent's did (the expert alone was quantized; nothing retrained or re-observed the student)
    import torch

    from toolchain import engine

    new_run = RunDir(tmp_path / "new")
    x = engine.normalise(run.splits().test[0], run.input_spec)
    with torch.no_grad():
        g = torch.sigmoid(new_run.load_student().gate(x)).squeeze(1)
        old_q, new_q = run.load_student_qat()(x), new_run.load_student_qat()(x)
    sure = g > 0.999
    assert sure.float().mean() > 0.8, g
    torch.testing.assert_close(new_q[sure], old_q[sure], atol=0.02 * float(old_q.abs().max()), rtol=0)
    assert (tmp_path / "new" / "student_qat_kept.pt").read_bytes() == (parent / "student_qat.pt").read_bytes()
    new = RunDir(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "reports" / "refresh.json").read_text())
    assert saved["parent"] == str(parent.resolve()) and saved["samples"]["sha256"] == new.data_record()["refresh"]["sha256"]
    assert sorted(saved["samples"]["ids_train"] + saved["samples"]["ids_holdout"]) == [s.id for s in ss]
    assert len(saved["candidates_test_accuracy"]) == 3 and all(0 < a <= 1 for a in saved["candidates_test_accuracy"])
    sp = new.splits()  # the refreshed run's splits include the collected samples; test is the original one
    base = run.splits()
    assert len(sp.train[1]) > len(base.train[1]) and len(sp.val[1]) == len(base.val[1]) + len(saved["samples"]["ids_holdout"])
    np.testing.assert_array_equal(sp.test[1], base.test[1])
    assert (tmp_path / "new" / "bundles" / "onnx-fp32" / "manifest.json").is_file()
    assert not (parent / "refresh").exists()  # the parent run is never touched


def test_a_refresh_of_a_refreshed_run_keeps_its_student_and_does_not_grow(tiny_run, tmp_path):
    """The loop runs again: the gated parent's student stays as it was, its expert continues, the gate is new."""
    import torch

    from toolchain.models import GatedExperts

    parent = _parent(tiny_run, tmp_path, candidates=1)
    run = RunDir(parent)
    ss = _samples(run, 120)
    db = tmp_path / "gw.sqlite"
    from cloud_gateway.store import GatewayStore
    from edgecore import wire

    GatewayStore(db).samples.add([
        {"device_id": s.device, "received": s.received, "input": wire.encode_tensor(s.input),
         "teacher_probs": wire.encode_tensor(s.teacher_probs), "teacher_label": s.teacher_label,
         "uncertainty": s.uncertainty, "flagged": False, "human_label": s.human_label} for s in ss])
    first = refresh(parent=parent, out=tmp_path / "r1", source=str(db), targets=["onnx-fp32"], show=False)
    second = refresh(parent=tmp_path / "r1", out=tmp_path / "r2", source=str(db), targets=["onnx-fp32"], show=False)
    assert first["passed"] and second["passed"], (first["gates"], second["gates"])
    student, m1, m2 = run.load_student(), RunDir(tmp_path / "r1").load_student(), RunDir(tmp_path / "r2").load_student()
    assert isinstance(m1, GatedExperts) and isinstance(m2, GatedExperts)
    assert not isinstance(m2.base, GatedExperts)  # not nested: the same size after every refresh
    assert sum(p.numel() for p in m2.parameters()) == sum(p.numel() for p in m1.parameters())
    for name, v in student.state_dict().items():  # the production student, unchanged through both refreshes
        torch.testing.assert_close(m2.base.state_dict()[name], v, rtol=0, atol=0)
    assert (tmp_path / "r2" / "bundles" / "onnx-fp32" / "manifest.json").is_file()
    # the kept program passes down unchanged, so the next refresh keeps the same student in int8 too
    kept = (tmp_path / "r2" / "student_qat_kept.pt").read_bytes()
    assert kept == (tmp_path / "r1" / "student_qat_kept.pt").read_bytes() == (parent / "student_qat.pt").read_bytes()


def test_the_expert_strategy_refuses_a_parent_without_a_quantized_program_before_training(tiny_run, tmp_path,
                                                                                       monkeypatch):
    """Keeping the student means keeping its int8 program too: without one, say so at once (no QAT of the whole
    gated model, which would move the kept student's answers)."""
    from cloud_gateway.store import GatewayStore
    from edgecore import wire
    from toolchain import engine

    parent = _parent(tiny_run, tmp_path)
    (parent / "student_qat.pt").unlink()
    ss = _samples(RunDir(parent), 40)
    GatewayStore(tmp_path / "gw.sqlite").samples.add([
        {"device_id": s.device, "received": s.received, "input": wire.encode_tensor(s.input),
         "teacher_probs": wire.encode_tensor(s.teacher_probs), "teacher_label": s.teacher_label,
         "uncertainty": s.uncertainty, "flagged": False, "human_label": s.human_label} for s in ss])

    def no_training(*a, **kw):
        raise AssertionError("the refresh trained before refusing")

    monkeypatch.setattr(engine, "fit", no_training)
    with pytest.raises(RefreshError, match=r"no quantized program \(student_qat\.pt\).*strategy = 'continue'"):
        refresh(parent=parent, out=tmp_path / "new", source=str(tmp_path / "gw.sqlite"), targets=["onnx-fp32"],
                show=False)


def test_a_failed_gate_keeps_the_report_and_writes_no_bundles(tiny_run, tmp_path):
    # "continue": the refreshed student replaces the old one, so learning wrong labels costs original accuracy
    # (with the default "expert" strategy the gate keeps the original inputs on the unchanged student)
    parent = _parent(tiny_run, tmp_path, max_regression_pt=0.0, epochs=1, lr=0.05, strategy="continue")
    ss = _samples(RunDir(parent), 60, human=False)
    for s in ss:  # the person labelled everything "0": learning it must cost accuracy on the original split
        object.__setattr__(s, "human_label", 0)
    from cloud_gateway.store import GatewayStore
    from edgecore import wire

    store = GatewayStore(tmp_path / "gw.sqlite")
    store.samples.add([{"device_id": s.device, "received": s.received, "input": wire.encode_tensor(s.input),
                        "teacher_probs": wire.encode_tensor(s.teacher_probs), "teacher_label": s.teacher_label,
                        "uncertainty": s.uncertainty, "flagged": False, "human_label": 0} for s in ss])
    r = subprocess.run([sys.executable, "-m", "toolchain.cli", "refresh", "--from", str(tmp_path / "gw.sqlite"),
                        "--run", str(parent), "--out", str(tmp_path / "new"), "--targets", "onnx-fp32"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "refresh gates failed" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    table = r.stderr.split("refresh gates failed")[0]  # the table's lines, before the error
    assert "pt lost, 95% interval" in table and "McNemar p" in table  # how sure the loss is, for the operator
    assert "inputs lost" in r.stderr.split("refresh gates failed")[1]  # and in the error the demo's summary carries
    assert (tmp_path / "new" / "reports" / "refresh.json").is_file()
    assert not (tmp_path / "new" / "bundles").exists()


def test_a_build_that_fails_its_gate_refuses_the_refresh_with_the_reason(tiny_run, tmp_path, monkeypatch):
    """The refreshed int8 artifact may fail its own accuracy gate: the refresh is refused (a failed gate, the
    build's reason in the error and the report), not crashed, and the other targets' bundles are not kept."""
    import toolchain.bundle as tb
    from edgecore.errors import AccuracyGateError

    parent = _parent(tiny_run, tmp_path, epochs=1)
    ss = _samples(RunDir(parent), 60)
    real = tb.build_bundle

    def build(**kw):
        if kw["precision"] == "int8":
            raise AccuracyGateError("onnx int8 build failed verification: accuracy 80.00% is 2.00 pt below the "
                                    "PyTorch reference 82.00% (budget 1.00 pt, over by 1.00 pt)")
        return real(**kw)

    monkeypatch.setattr(tb, "build_bundle", build)
    srv = _serve_pages(ss, "tok")
    try:
        with pytest.raises(RefreshError, match=r"build onnx-int8: AccuracyGateError: onnx int8 build failed"):
            refresh(parent=parent, out=tmp_path / "new", source=f"http://127.0.0.1:{srv.server_address[1]}",
                    token="tok", targets=["onnx-fp32", "onnx-int8"], show=True)
    finally:
        srv.shutdown()
    saved = json.loads((tmp_path / "new" / "reports" / "refresh.json").read_text())
    gate = next(g for g in saved["gates"] if g["gate"] == "build onnx-int8")
    assert gate["ok"] is False and "2.00 pt below" in gate["error"] and not saved["passed"]
    assert not (tmp_path / "new" / "bundles").exists()  # onnx-fp32 built fine, but a refused refresh ships nothing


def test_a_device_refresh_spends_the_offload_budget_on_what_that_device_sees(tiny_run, tmp_path):
    """Refreshing for one device: routing threshold and drift reference come from its collected held-out inputs."""
    from edgecore.bundle import TrustPolicy
    from edgecore.confidence import confidence
    from targets import load_runner

    parent = _parent(tiny_run, tmp_path)
    ss = _samples(RunDir(parent), 300)
    srv = _serve_pages(ss, "tok")
    try:
        rep = refresh(parent=parent, out=tmp_path / "new", source=f"http://127.0.0.1:{srv.server_address[1]}",
                      token="tok", device="edge-3", targets=["onnx-fp32"], show=False)
    finally:
        srv.shutdown()
    assert rep["passed"], rep["gates"]
    b = TrustPolicy(allow_unsigned=True).open(tmp_path / "new" / "bundles" / "onnx-fp32")
    r = b.manifest.to_dict()["routing"]
    assert "collected held-out" in r["fitted_on"]
    held = len(rep["samples"]["ids_holdout"])
    x_val, _ = RunDir(tmp_path / "new").splits().val
    logits = load_runner(b).run(b.input_spec.preprocess(x_val[-held:]))
    conf = confidence(logits, measure=r["measure"], temperature=r["temperature"])
    # the budget is spent on the device's own inputs (the rule may offload less when more buys nothing)
    assert float((conf < r["threshold"]).mean()) <= r["offload_budget"] + 1.0 / held
    assert b.drift_reference()["n"] == held


def test_paired_difference_counts_the_disagreements_and_says_how_sure():
    from scipy.stats import binomtest

    before = np.array([True] * 350 + [False] * 10)
    after = before.copy()
    after[:7] = False  # 7 lost
    after[350:352] = True  # 2 gained
    pr = paired_difference(before, after)
    assert (pr["inputs"], pr["lost"], pr["gained"]) == (360, 7, 2)
    assert pr["lost_pt"] == pytest.approx(100 * 5 / 360, abs=0.01)
    lo, hi = pr["lost_pt_ci95"]
    assert lo < pr["lost_pt"] < hi and hi - lo > 1.0  # 5 net inputs of 360 cannot be resolved to 0.5 pt
    assert pr["mcnemar_p"] == pytest.approx(binomtest(2, 9, 0.5).pvalue, abs=1e-4)
    same = paired_difference(before, before)
    assert (same["lost"], same["gained"], same["lost_pt"], same["mcnemar_p"]) == (0, 0, 0.0, 1.0)
    assert same["lost_pt_ci95"] == [0.0, 0.0]
    many = paired_difference(np.ones(10000, bool), np.arange(10000) % 20 != 0)  # 5% lost, none gained: sure
    assert many["lost_pt"] == 5.0 and many["mcnemar_p"] < 1e-9 and many["lost_pt_ci95"][0] > 4.0
    big_b, big_a = np.ones(30000, bool), np.arange(30000) % 10 != 0  # 3000 lost ...
    big_a[np.arange(30000) % 10 == 1] = True
    big_b[np.arange(30000) % 10 == 1] = False  # ... and 3000 gained: the approximation's branch, no difference
    assert paired_difference(big_b, big_a)["mcnemar_p"] == pytest.approx(binomtest(3000, 6000, 0.5).pvalue, abs=1e-3)
    big_a[:600:10] = True  # 60 fewer lost: 2940 vs 3000
    assert paired_difference(big_b, big_a)["mcnemar_p"] == pytest.approx(binomtest(2940, 5940, 0.5).pvalue, abs=1e-3)
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_difference(before, after[:-1])


def test_soup_averages_the_weights_and_measures_batchnorm_again():
    import torch
    from torch import nn

    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(),
                             nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(3))

    x = torch.randn(70, 1, 5, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1  # not BatchNorm's start
    states = []
    for seed in (0, 1, 2):
        m = net(seed)
        m(x[:2])  # materialise the lazy layer
        states.append({k: v.clone() for k, v in m.state_dict().items()})
    model = net(9)
    model(x[:2])
    soup(model, states, x, batch_size=32)  # three batches, the last one short
    for k in ("0.weight", "0.bias", "5.weight"):
        torch.testing.assert_close(model.state_dict()[k], sum(s[k] for s in states) / 3)
    bn = model[1]
    with torch.no_grad():
        h = model[0](x)
    # the statistics of the averaged conv's outputs over all of x (batches of 24/23/23: each input ~once)
    torch.testing.assert_close(bn.running_mean, h.mean((0, 2, 3)), rtol=0, atol=2e-3)
    torch.testing.assert_close(bn.running_var, h.var((0, 2, 3)), rtol=0.05, atol=0)
    assert bn.momentum == 0.3 and not model.training and not bn.training  # put back as it was, ready to export
