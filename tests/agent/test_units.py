"""Agent building blocks without a broker: wire format, histograms, drift, outbox, sources, trust."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from device_agent.agent import Agent, AgentConfig, Route, summarize
from device_agent.drift import DriftConfig, DriftMonitor, ks_2samp, psi
from device_agent.histogram import LatencyHistogram
from device_agent.outbox import DropPolicy, Outbox
from device_agent.sources import folder_source, iterator_source, npz_source
from device_agent.telemetry import TelemetryRecorder, WindowCounters
from edgecore import wire
from edgecore.bundle import TrustPolicy, open_bundle
from edgecore.confidence import confidence, confidence_one, row_scorer
from edgecore.errors import AgentError, BundleTrustError
from tests.agent.tiny import items, release_trust


def test_tensor_roundtrip_and_errors():
    x = np.random.default_rng(0).normal(size=(1, 1, 8, 8)).astype(np.float32)
    b = wire.encode_tensor(x)
    assert len(b) == 8 + 16 + 256  # header + 4 dims + raw floats: compact, not JSON
    np.testing.assert_array_equal(wire.decode_tensor(b), x)
    for bad, why in [(b"", "shorter"), (b"XX" + b[2:], "magic"), (b[:-4], "needs"), (b + b"\0", "needs")]:
        with pytest.raises(wire.WireError, match=why):
            wire.decode_tensor(bad)
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.decode_tensor(b, max_bytes=100)
    assert wire.decode_tensor(wire.encode_tensor(np.arange(3, dtype=np.int64))).tolist() == [0, 1, 2]
    with pytest.raises(wire.WireError, match="schema"):
        wire.loads(b'{"schema": 99}')


def test_latency_histogram_percentiles():
    h = LatencyHistogram()
    for v in np.linspace(0.001, 0.1, 1000):
        h.observe(float(v))
    s = h.summary()
    assert s["count"] == 1000
    assert 0.045 <= s["p50"] <= 0.065 and 0.09 <= s["p95"] <= 0.13 and s["p99"] >= s["p95"]
    snap = h.snapshot_and_reset()
    assert snap.count == 1000 and h.count == 0 and h.quantile(0.5) is None
    assert len(h.counts) == len(snap.counts) == 386  # fixed buckets: memory does not grow with inputs


@pytest.mark.parametrize("name", ["uniform", "lognormal", "bimodal", "three", "constant", "microseconds"])
def test_latency_histogram_percentiles_within_5_percent_of_numpy(name):
    rng = np.random.default_rng(7)
    data = {
        "uniform": rng.uniform(1e-5, 2e-3, 4000),
        "lognormal": rng.lognormal(np.log(1e-4), 0.6, 4000),  # a long tail, as latencies have
        "bimodal": np.concatenate([rng.normal(8e-5, 4e-6, 3000), rng.normal(2e-3, 1e-4, 1000)]),
        "three": np.array([1e-4, 2e-4, 3e-4]),
        "constant": np.full(50, 1.234e-4),
        "microseconds": rng.uniform(2e-6, 9e-6, 1000),  # a tiny model on a fast runtime
    }[name]
    h = LatencyHistogram()
    for v in data:
        h.observe(float(v))
    for q in (0.0, 0.5, 0.9, 0.95, 0.99, 1.0):
        exact = float(np.percentile(data, 100 * q))
        assert h.quantile(q) == pytest.approx(exact, rel=0.05), (q, h.quantile(q), exact)
    assert h.summary()["mean"] == pytest.approx(float(data.mean()))


def test_latency_histograms_merge_like_one():
    rng = np.random.default_rng(3)
    a, b = rng.lognormal(-9, 0.5, 500), rng.lognormal(-7, 0.5, 500)
    ha, hb, hab = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    for v in a:
        ha.observe(float(v))
        hab.observe(float(v))
    for v in b:
        hb.observe(float(v))
        hab.observe(float(v))
    ha.merge(hb)
    assert ha.counts == hab.counts and ha.summary() == pytest.approx(hab.summary())


def _drift_reference(rng: np.random.Generator) -> dict:
    def block(sample: np.ndarray) -> dict:
        counts, edges = np.histogram(sample, bins=10)
        return {"counts": counts.tolist(), "edges": edges.tolist(), "sample": sample.tolist()}

    return {"confidence": block(rng.beta(8, 1, 400)),
            "features": {"mean": block(rng.normal(5.0, 1.0, 400)), "std": block(rng.gamma(4.0, 1.5, 400))}}


@pytest.mark.parametrize("batches", [[1] * 700, [3, 1, 64, 1, 600, 7, 1, 250], [1] * 40])
def test_drift_monitor_vectorised_matches_per_sample_statistics(batches):
    """The ring of sums gives the scores the per-sample mean/std of the last ``window`` inputs give."""
    rng = np.random.default_rng(11)
    ref = _drift_reference(rng)
    cfg = DriftConfig(window=500, min_samples=30)
    mon = DriftMonitor(ref, cfg)
    kept: list[tuple[float, float, float]] = []
    for k in batches:
        raw = rng.uniform(0, 16, size=(k, 1, 8, 8)).astype(np.float32) * rng.uniform(0.2, 1.0)
        conf = rng.beta(6, 1, size=k)
        mon.observe(confidence=conf, raw=raw)
        flat = raw.reshape(k, -1).astype(np.float64)
        kept += [(float(c), float(r.mean()), float(r.std())) for c, r in zip(conf, flat)]
    kept = kept[-cfg.window:]
    expected = DriftMonitor(ref, cfg)
    for c, m, sd in kept:  # the reference: one exact sample at a time, statistics already computed
        expected._put(np.array([[c], [m], [sd]]))
    for i, name in enumerate(DriftMonitor.STATS):
        assert sorted(mon.live(name)) == pytest.approx(sorted(v[i] for v in kept), rel=1e-9, abs=1e-12)
    got, want = mon.scores(), expected.scores()
    if len(kept) < cfg.min_samples:
        assert got is None and want is None
    else:
        assert got["n"] == want["n"] == len(kept) and got["flag"] == want["flag"]
        for name in DriftMonitor.STATS:
            assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-12)
    mon.reset(ref)
    assert mon.scores() is None and len(mon.live("mean")) == 0


def test_drift_scores_separate_same_from_shifted():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=2000)
    counts, edges = np.histogram(ref, bins=20)
    same, shifted = rng.normal(size=500), rng.normal(loc=1.0, size=500)
    assert psi(counts, edges, same) < 0.1 < 0.25 < psi(counts, edges, shifted)
    d0, p0 = ks_2samp(same, ref)
    d1, p1 = ks_2samp(shifted, ref)
    assert p0 > 0.01 and p1 < 1e-6 and d1 > d0


def test_a_small_window_from_the_reference_distribution_raises_no_false_alarm():
    """Right after a start or a new bundle the window holds a few dozen inputs. PSI over 10 bins is biased up on so
    few (one empty bin alone scores ~0.7): counted there, 146 of 200 same-distribution windows of 50 flagged drift
    and a canary rollout watching ``drift == 0`` rolled a good bundle back. Below ``psi_min_per_bin`` inputs per
    reference bin only the KS test, whose p-value holds at any size, decides."""
    rng = np.random.default_rng(3)
    ref = _drift_reference(rng)
    cfg = DriftConfig(window=500, min_samples=50)
    alarms = {50: 0, 120: 0, 500: 0}
    for n in alarms:
        for _ in range(200):
            mon = DriftMonitor(ref, cfg)
            conf = rng.beta(8, 1, n)
            mean, std = rng.normal(5.0, 1.0, n), rng.gamma(4.0, 1.5, n)
            mon._put(np.stack([conf, mean, std]))  # inputs whose statistics follow the reference
            sc = mon.scores()
            alarms[n] += sc["flag"]
            assert set(sc) == {"n", "flag", *DriftMonitor.STATS}  # the wire's drift block: no new keys
    # KS at 1% on three statistics: a few per cent (with PSI counted: 146 of 200 at 50)
    assert all(a <= 20 for a in alarms.values()), alarms
    # a real shift is still caught on a small window (KS), and on a full one PSI counts again
    for n in (60, 500):
        mon = DriftMonitor(ref, cfg)
        mon._put(np.stack([rng.beta(8, 1, n), rng.normal(6.5, 1.0, n), rng.gamma(4.0, 1.5, n)]))
        sc = mon.scores()
        assert sc["flag"] is True and sc["mean"]["ks_p"] < cfg.ks_alpha
        assert n < 500 or sc["mean"]["psi"] > cfg.psi_threshold


def test_a_significant_but_immaterial_shift_is_not_drift():
    """A full window tells apart distributions that differ by too little to matter (a quarter of the inputs a
    little less sure than the reference): KS alone flagged it. Flagging needs KS D >= ks_min_d, or PSI over
    ``psi_threshold`` on a full window."""
    rng = np.random.default_rng(0)
    ref = _drift_reference(rng)
    cfg = DriftConfig(window=500)

    def window(conf):
        mon = DriftMonitor(ref, cfg)
        mon._put(np.stack([conf, rng.normal(5.0, 1.0, 500), rng.gamma(4.0, 1.5, 500)]))
        return mon.scores()

    slight = window(np.concatenate([rng.beta(8, 1, 375), rng.beta(2.5, 1, 125)]))
    c = slight["confidence"]
    assert c["ks_p"] < cfg.ks_alpha / 10  # the difference is there, beyond doubt ...
    assert c["ks_d"] < cfg.ks_min_d and c["psi"] < cfg.psi_threshold  # ... and small
    assert slight["flag"] is False
    unsure = window(rng.beta(2.5, 1, 500))  # a model that has lost its footing
    assert unsure["flag"] is True and unsure["confidence"]["ks_d"] >= cfg.ks_min_d


def test_drift_monitor_flags_shifted_inputs(tiny_cascade):
    run = tiny_cascade
    ref = open_bundle(run.bundle_dir).drift_reference()
    mon = DriftMonitor(ref, DriftConfig(min_samples=50))
    conf = np.full(len(run.x_test), 0.99)
    mon.observe(confidence=conf[:10], raw=run.x_test[:10])
    assert mon.scores() is None  # too few samples to say anything
    mon.reset(ref)
    import onnxruntime as ort

    from calibration.confidence import confidence

    s = ort.InferenceSession(str(run.student_onnx))
    logits = s.run(None, {"input": run.spec.preprocess(run.x_test)})[0]
    c = confidence(logits, measure="max_prob", temperature=ref["temperature"])
    mon.observe(confidence=c, raw=run.x_test)
    assert mon.scores()["flag"] is False
    mon.reset(ref)
    dim = run.x_test * 0.4  # faded sensor
    mon.observe(confidence=c, raw=dim)
    sc = mon.scores()
    assert sc["flag"] is True and sc["mean"]["psi"] > 0.25


@pytest.mark.parametrize("measure", ["max_prob", "margin", "entropy"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 3.0])
def test_one_input_confidence_is_the_batch_confidence(measure, temperature):
    """The agent's one-input path scores exactly as the batch path (and the build) does, as a float."""
    rng = np.random.default_rng(5)
    for logits in [rng.normal(0, 4, size=(1, 10)).astype(np.float32), np.array([[50.0, -50.0, 0.0]], np.float32),
                   rng.normal(size=(1, 100)).astype(np.float32)]:  # more classes than the list fast path takes
        one = confidence_one(logits, measure=measure, temperature=temperature)
        assert isinstance(one, float)
        assert one == pytest.approx(float(confidence(logits, measure=measure, temperature=temperature)[0]), rel=1e-12)


def test_one_edge_count_is_the_general_count(tmp_path):
    a = TelemetryRecorder(None, window=WindowCounters(tmp_path / "a.win"))
    b = TelemetryRecorder(None, window=WindowCounters(tmp_path / "b.win"))
    for _ in range(3):
        a.count_one_edge()
        b.count({"inputs": 1, "edge": 1})
    a.count({"fallback": 1, "inputs": 1})
    b.count({"fallback": 1, "inputs": 1})
    assert a.totals == b.totals and a.window.counts() == b.window.counts()
    assert a.window.counts()["inputs"] == 4 and a.window.counts()["edge"] == 3
    assert WindowCounters(tmp_path / "a.win").counts() == a.window.counts()  # in the mapped file, not only memory


def test_outbox_order_bound_and_drop_counting(tmp_path):
    box = Outbox(tmp_path / "o.sqlite", max_rows=3)
    for i in range(5):
        assert box.put("t", f"m{i}".encode())
    assert len(box) == 3 and box.dropped == 2
    got = []
    while (row := box.peek()) is not None:
        got.append(row[2])
        box.ack(row[0])
    assert got == [b"m2", b"m3", b"m4"]  # oldest dropped, the rest in order
    seqs = [box.next_seq() for _ in range(3)]
    box.close()
    again = Outbox(tmp_path / "o.sqlite", max_rows=3)  # survives a restart of the agent
    assert again.dropped == 2 and again.next_seq() == seqs[-1] + 1
    newest = Outbox(tmp_path / "n.sqlite", max_rows=1, policy=DropPolicy.DROP_NEWEST)
    assert newest.put("t", b"a") and not newest.put("t", b"b")
    assert newest.peek()[2] == b"a" and newest.dropped == 1
    with pytest.raises(AgentError):
        Outbox(tmp_path / "x.sqlite", max_rows=0)


def test_sources(tmp_path, tiny_cascade):
    spec = tiny_cascade.spec
    x, y = tiny_cascade.x_test[:6], tiny_cascade.y_test[:6]
    np.savez(tmp_path / "d.npz", x=x, y=y)
    got = list(npz_source(tmp_path / "d.npz", spec))
    assert [g.label for g in got] == y.tolist() and np.array_equal(got[0].raw, x[0])
    folder = tmp_path / "f"
    folder.mkdir()
    np.save(folder / "a.npy", x[0])
    np.save(folder / "b.npy", x[1:3])
    from PIL import Image

    Image.fromarray((x[3, 0] * 15).astype(np.uint8)).save(folder / "c.png")
    got = list(folder_source(folder, spec))
    assert [g.id for g in got] == ["a.npy", "b.npy[0]", "b.npy[1]", "c.png"]
    assert got[3].raw.shape == (1, 8, 8)
    assert len(list(iterator_source(((s, int(l)) for s, l in zip(x, y)), spec))) == 6
    with pytest.raises(AgentError, match="does not match"):
        list(iterator_source([np.zeros((3, 3))], spec))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AgentError, match="no images"):
        list(folder_source(tmp_path / "empty", spec))


def test_bundle_trust_refusals(tmp_path, tiny_cascade):
    bad = tmp_path / "b"
    shutil.copytree(tiny_cascade.bundle_dir, bad)
    with open(bad / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleTrustError, match="model.onnx: size"):
        Agent(bad, AgentConfig(device_id="x", trust=release_trust()))
    m = json.loads((tiny_cascade.bundle_dir / "manifest.json").read_text())
    shutil.rmtree(bad)
    shutil.copytree(tiny_cascade.bundle_dir, bad)
    (bad / "manifest.json").write_text(json.dumps({**m, "schema_version": 42}))
    with pytest.raises(BundleTrustError, match="schema version 42"):
        Agent(bad, AgentConfig(device_id="x", trust=release_trust()))
    (bad / "manifest.json").write_text(json.dumps({**m, "target": "coreml"}))
    with pytest.raises(BundleTrustError, match="does not match the manifest"):  # edited after signing
        Agent(bad, AgentConfig(device_id="x", trust=release_trust()))
    (bad / "manifest.sig").unlink()
    with pytest.raises(BundleTrustError, match="bundle is not signed"):
        Agent(bad, AgentConfig(device_id="x", trust=release_trust()))
    with pytest.raises(BundleTrustError, match="no trusted public key is configured.*--trust-key"):
        Agent(bad, AgentConfig(device_id="x"))  # the default trusts nothing
    with pytest.raises(Exception, match="coreml"):  # development mode: unsigned passes, the runtime refuses
        Agent(bad, AgentConfig(device_id="x", trust=TrustPolicy(allow_unsigned=True)))


def test_edge_only_agent_answers_everything_and_commands(tiny_cascade):
    run = tiny_cascade
    agent = Agent(run.bundle_dir, AgentConfig(device_id="x", trust=release_trust()))
    ans = list(agent.run(items(run.x_test[:50], run.y_test[:50])))
    s = summarize(ans)
    assert s["inputs"] == 50 and s["edge"] + s["fallback"] == 50
    assert all(a.reason == "broker" for a in ans if a.route is Route.FALLBACK)  # no broker: counted fallback
    assert agent.fleet.handle_command({"schema": 1, "cmd": "set_threshold", "threshold": 0.0})["ok"]
    assert summarize(list(agent.run(items(run.x_test[:50]))))["edge"] == 50
    out = agent.fleet.handle_command({"schema": 1, "cmd": "set_threshold", "threshold": "nan"})
    assert not out["ok"] and agent.threshold == 0.0
    assert not agent.fleet.handle_command({"schema": 1, "cmd": "reboot"})["ok"]
    # an id comes back in the outcome (and so in the status' last_cmd), on success and on failure
    assert agent.fleet.handle_command({"cmd": "set_threshold", "threshold": 0.5, "id": "op-7"}) == \
        {"cmd": "set_threshold", "id": "op-7", "ok": True}
    out = agent.fleet.handle_command({"cmd": "set_threshold", "threshold": "nan", "id": 8})
    assert out["id"] == 8 and not out["ok"] and agent.fleet.last_cmd == out and agent.fleet.status()["last_cmd"]["id"] == 8
    for odd in ({"a": 1}, ["x"], True, "x" * 129, None):  # not an id: not echoed
        assert "id" not in agent.fleet.handle_command({"cmd": "set_threshold", "threshold": 0.5, "id": odd})


def test_live_failure_after_a_swap_rolls_back(tiny_cascade, tmp_path):
    import dataclasses

    from tests.agent.tiny import retag_bundle

    run = tiny_cascade
    retag_bundle(run.bundle_dir, tmp_path / "v2", version="2")
    agent = Agent(run.bundle_dir, AgentConfig(device_id="x", trust=release_trust(), threads=1))
    agent.swap_bundle(open_bundle(tmp_path / "v2"))
    assert agent.bundle.version == "2"

    class Boom:
        def run(self, batch):
            raise RuntimeError("runtime crashed")

    agent.model._current = dataclasses.replace(agent.model.current, runner=Boom())  # the serving one breaks live
    ans = list(agent.run(items(run.x_test[:20], run.y_test[:20])))
    assert len(ans) == 20 and summarize(ans)["accuracy"] > 0.8  # answered by the previous bundle
    assert agent.bundle.version == "1" and agent.counts["rollbacks"] == 1
    assert agent.fleet.last_cmd and not agent.fleet.last_cmd["ok"] and "rolled back" in agent.fleet.last_cmd["error"]


def test_a_new_bundle_clears_the_drift_verdict_of_the_old_one(tiny_cascade, tmp_path):
    """After a switch the device stops acting as drifted (no drift_offload share) until its new reference says so."""
    from tests.agent.tiny import retag_bundle

    run = tiny_cascade
    retag_bundle(run.bundle_dir, tmp_path / "v2", version="2")
    agent = Agent(run.bundle_dir, AgentConfig(device_id="x", trust=release_trust(), threads=1, threshold=0.0,
                                              drift_offload=1.0))
    agent.telemetry.last_drift = {"flag": True, "n": 500}  # the old bundle's last window said: drifting
    flagged = summarize(list(agent.run(items(run.x_test[:20]))))
    assert flagged["fallback"] == 20  # while drifted, even confident inputs go to the cloud (none here: fallback)
    agent.swap_bundle(open_bundle(tmp_path / "v2"))
    assert agent.last_drift is None
    assert summarize(list(agent.run(items(run.x_test[:20]))))["edge"] == 20


# --- the one-input path: scorer, deferred histogram and drift, recorder ----------------------------

@pytest.mark.parametrize("measure", ["max_prob", "margin", "entropy"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 3.0])
def test_row_scorer_is_the_batch_confidence(measure, temperature):
    """(top class, confidence) of one output row, float or int8 (read without dequantizing), as the batch path."""
    rng = np.random.default_rng(8)
    for logits in [rng.normal(0, 4, size=(1, 10)), np.array([[50.0, -50.0, 0.0]]), np.array([[2.0, 7.0, 7.0, 1.0]])]:
        pred, conf = row_scorer(measure, temperature)(logits[0].tolist())
        assert pred == int(logits[0].argmax())  # the first of equal tops, as argmax
        assert conf == pytest.approx(float(confidence(logits, measure=measure, temperature=temperature)[0]), rel=1e-9)
    for scale, zero in [(0.1, -5), (0.013, 20), (0.5, 0)]:
        for q in [rng.integers(-128, 128, size=10), np.array([-128, 127, 127, 0]), np.array([5, 5, 5])]:
            logits = ((q - zero) * scale)[None]
            pred, conf = row_scorer(measure, temperature, (scale, -128, 127))(q.tolist())
            assert pred == int(logits[0].argmax())
            want = float(confidence(logits, measure=measure, temperature=temperature)[0])
            assert conf == pytest.approx(want, rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        row_scorer(measure, 0.0)


def test_latency_histogram_observe_many_is_observe_one_by_one():
    rng = np.random.default_rng(4)
    edges = 10.0 ** (-6 + np.arange(9) / 48)  # on bucket bounds
    data = np.concatenate([rng.lognormal(np.log(2e-5), 0.7, 3000), [1e-7, 1e-6, 99.0, 500.0], edges])
    one, many = LatencyHistogram(), LatencyHistogram()
    for v in data:
        one.observe(float(v))
    many.observe_many(data[:1000].tolist())
    many.observe_many(data[1000:])
    many.observe_many([])
    assert many.counts == one.counts and many.summary() == pytest.approx(one.summary())


def _same_scores(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and got["n"] == want["n"] and got["flag"] == want["flag"]
    for name in DriftMonitor.STATS:
        assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-12)


def test_drift_monitor_observe_bytes_is_observe():
    """Inputs handed over as float32 bytes score as the same inputs observed as arrays, in any mix of sizes."""
    rng = np.random.default_rng(12)
    ref = _drift_reference(rng)
    cfg = DriftConfig(window=300, min_samples=30)
    raw = rng.uniform(0, 16, size=(400, 1, 8, 8)).astype(np.float32)
    conf = rng.beta(6, 1, size=400)
    a, b = DriftMonitor(ref, cfg), DriftMonitor(ref, cfg)
    a.observe(confidence=conf, raw=raw)
    b.observe_bytes(tuple(conf[:250]), tuple(r.tobytes() for r in raw[:250]))
    b.observe_bytes(list(conf[250:]), [r.tobytes() for r in raw[250:]])
    for name in DriftMonitor.STATS:
        assert sorted(b.live(name)) == pytest.approx(sorted(a.live(name)), rel=1e-9)
    _same_scores(b.scores(), a.scores())
    small = rng.uniform(0, 1, size=(5, 4)).astype(np.float32)  # another size in the middle of a block
    c = DriftMonitor(ref, cfg)
    c.observe_bytes([0.9, 0.8, 0.7, 0.6], [raw[0].tobytes(), small[0].tobytes(), small[1].tobytes(), raw[1].tobytes()])
    means = [raw[0].mean(), small[0].mean(), small[1].mean(), raw[1].mean()]
    assert sorted(c.live("mean")) == pytest.approx(sorted(means), rel=1e-6)


def test_record_edge_counts_at_once_and_folds_what_it_holds_when_read(tmp_path):
    """`record_edge`: counters in the mapped window at once; durations and drift data pending until read."""
    rng = np.random.default_rng(13)
    ref = _drift_reference(rng)
    cfg = DriftConfig(window=500, min_samples=30)
    rec = TelemetryRecorder(ref, cfg, WindowCounters(tmp_path / "w.win"))
    raw = rng.uniform(0, 16, size=(600, 1, 8, 8)).astype(np.float32)
    conf, secs = rng.beta(6, 1, size=600), rng.lognormal(np.log(2e-5), 0.5, size=600)
    for i in range(600):
        rec.record_edge(float(secs[i]), float(conf[i]), raw[i] if i % 3 else raw[i].astype(np.float64))
        if i == 100:  # nothing folded yet (fewer than PENDING_MAX): the mapped file already has the counts
            assert WindowCounters(tmp_path / "w.win").counts()["inputs"] == 101
    assert WindowCounters(tmp_path / "w.win").counts()["edge"] == 600 and rec.totals["edge"] == 600
    assert rec.edge_latency.count == 600  # reading folds what is pending
    want = DriftMonitor(ref, cfg)
    want.observe(confidence=conf, raw=raw)
    _same_scores(rec.drift.scores(), want.scores())
    rec.record_edge(1e-5, 0.9, raw[0])
    msg = rec.close_window(t_end=1.0, emit=lambda m: 1)
    assert msg["counts"]["edge"] == 601 and msg["latency"]["edge"]["count"] == 601
    for i in range(10):
        rec.record_edge(2e-5, 0.9, raw[i])
    rec.reset_drift(ref)  # a new model: the pending durations still count, their drift data no longer applies
    assert rec.edge_latency.count == 10 and len(rec.drift.live("mean")) == 0


def test_pending_inputs_stay_within_the_byte_budget_from_the_first_input():
    """Large inputs (224x224 RGB floats, 602 KB) are folded within ``PENDING_BYTES`` from the first block on: the
    block was first sized by ``PENDING_MAX`` alone (1,024 such inputs, 600 MB, held before the first fold)."""
    rec = TelemetryRecorder(None)
    big = np.zeros((3, 224, 224), dtype=np.float32)
    for i in range(5):
        rec.record_edge(1e-3, 0.9, big + i)
        held = sum(len(p[2]) for p in rec._pending)
        assert held <= max(rec.PENDING_BYTES, big.nbytes), f"{held} bytes held after {i + 1} inputs"
    assert rec.edge_latency.count == 5 and len(rec.drift.live("mean")) == 5
    small = np.zeros((1, 8, 8), dtype=np.float32)  # a new bundle's smaller samples: the next block is sized anew
    for _ in range(10):
        rec.record_edge(1e-5, 0.9, small)
    assert len(rec._pending) == 10 and rec.edge_latency.count == 15


def test_uncertain_single_inputs_fall_back_counted_and_drift_offloads_every_kth(tiny_cascade):
    run = tiny_cascade
    agent = Agent(run.bundle_dir, AgentConfig(device_id="x", trust=release_trust(), threads=1, threshold=1.01))
    ans = list(agent.run(items(run.x_test[:12], run.y_test[:12])))
    assert [a.route for a in ans] == [Route.FALLBACK] * 12 and all(a.reason == "broker" for a in ans)
    assert agent.counts["fallback"] == agent.counts["fallback_broker"] == agent.counts["inputs"] == 12
    agent.set_threshold(0.0)
    agent.telemetry.last_drift = {"flag": True}
    ans = list(agent.run(items(run.x_test[:12])))  # drift_offload 0.25: every 4th sure input goes to the cloud
    assert [a.route for a in ans] == ([Route.EDGE] * 3 + [Route.FALLBACK]) * 3
    assert agent.counts["edge"] == 9 and agent.counts["inputs"] == 24
    assert agent.telemetry.edge_latency.count == 24


def test_a_runtime_path_that_disagrees_with_its_batch_path_is_not_used(tiny_cascade, caplog):
    import dataclasses

    from device_agent.model import load_model
    from targets import OneInput

    run = tiny_cascade
    good = load_model(open_bundle(run.bundle_dir), threads=1)

    class Liar:  # its batch path is the real one; its one-input path answers class 9 whatever comes
        def __init__(self, real):
            self.run = real.run

        def one_input(self, spec):
            return OneInput(lambda raw: [0.0] * 9 + [50.0])

    with caplog.at_level("WARNING"):
        m = dataclasses.replace(good, runner=Liar(good.runner))
    assert "disagrees with its batch path" in caplog.text
    for i in range(10):
        assert m.answer(run.x_test[i]) == pytest.approx(good.answer(run.x_test[i]))


def test_bad_single_inputs_are_refused_without_a_rollback(tiny_cascade, tmp_path):
    """Garbage or a wrong shape is the input's fault: a clear `AgentError`, and the serving bundle stays."""
    from device_agent.sources import Item
    from tests.agent.tiny import retag_bundle

    run = tiny_cascade
    retag_bundle(run.bundle_dir, tmp_path / "v2", version="2")
    agent = Agent(run.bundle_dir, AgentConfig(device_id="x", trust=release_trust(), threads=1, threshold=0.0))
    agent.swap_bundle(open_bundle(tmp_path / "v2"))  # a previous bundle to roll back to, were it a live failure
    for raw, match in [(np.full((1, 8, 8), "x"), "not a numeric sample"), (["a", "b"], "not a numeric sample"),
                       (np.zeros((8, 8), np.float32), r"shape \[8, 8\]"), (np.zeros(1), r"shape \[1\]")]:
        with pytest.raises(AgentError, match=match):
            agent.process([Item("bad", raw)])
    with pytest.raises(AgentError, match="not numeric samples"):
        agent.process([Item("a", run.x_test[0]), Item("b", np.full((1, 8, 8), "x"))])
    assert agent.bundle.version == "2" and agent.counts["rollbacks"] == 0 and agent.counts["inputs"] == 0
    as_u8 = agent.process([Item("u8", np.round(run.x_test[3]).astype(np.uint8))])[0]  # other dtypes: converted
    as_f64 = agent.process([Item("f64", np.round(run.x_test[3]).astype(np.float64))])[0]
    assert as_u8.prediction == as_f64.prediction and as_u8.confidence == pytest.approx(as_f64.confidence)
