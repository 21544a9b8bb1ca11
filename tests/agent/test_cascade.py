"""End to end on digits through a real Mosquitto: agent (student) + gateway (teacher)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from device_agent.agent import Route, summarize
from targets import load_runner
from tests.agent.tiny import items, make_agent, signing_key

pytestmark = pytest.mark.broker


def test_cascade_accuracy_and_offload(mosquitto, tiny_cascade, tmp_path):
    """Student LR on the agent + MLP teacher in the gateway (tests/agent/tiny.py), through the broker."""
    import onnxruntime as ort

    run = tiny_cascade
    m = measure_cascade(mosquitto, run.bundle_dir, run.teacher_onnx, run.x_test, run.y_test, tmp_path)
    print(json.dumps(m))
    s = m["summary"]
    sess = ort.InferenceSession(str(run.teacher_onnx))
    local_teacher = sess.run(None, {"input": run.spec.preprocess(run.x_test)})[0].argmax(1)
    assert m["teacher_accuracy"] == pytest.approx(float((local_teacher == run.y_test).mean()))
    assert s["cloud"] > 0 and s["fallback"] == 0
    assert 0.04 <= s["offload_rate"] <= 0.10  # threshold chosen for a 10% budget on val
    assert s["accuracy"] >= m["edge_accuracy"]  # the cloud fixes more than it breaks
    assert s["accuracy"] >= m["teacher_accuracy"] - 0.003  # the acceptance relation, on this pair
    accs = [c["accuracy"] for c in m["curve"]]
    assert accs[0] == pytest.approx(m["edge_accuracy"]) and accs[-1] == pytest.approx(m["teacher_accuracy"])


def measure_cascade(broker, bundle_dir, teacher, x_raw, y, tmp_path, *, device_id="dev-c", gateway_run=None):
    """Run the agent (bundle's own threshold) and an all-offload pass through a real gateway.

    Returns the measured summary at the bundle's threshold, the edge-only and
    teacher accuracies, and the accuracy/offload curve measured with the cloud
    answers that actually came back over MQTT.
    """
    from calibration.confidence import confidence
    from cloud_gateway.config import GatewayConfig, WorkerConfig
    from cloud_gateway.service import Gateway
    from edgecore.bundle import open_bundle

    user, pw = broker.gateway_credentials
    cfg = GatewayConfig(worker=WorkerConfig(broker_url=broker.url, username=user, password=pw),
                        teacher=teacher, db=str(tmp_path / "gw.sqlite"), http_port=None, threads=1)
    b = open_bundle(bundle_dir)
    with Gateway(cfg):
        with make_agent(broker, b, device_id, tmp_path, deadline_s=5.0, batch_size=8) as agent:
            answers = list(agent.run(items(x_raw, y)))
            agent.set_threshold(1.01)  # every input to the cloud: the teacher's answers, via MQTT
            cloud = list(agent.run(items(x_raw, y)))
    s = summarize(answers)
    assert s["inputs"] == len(y) and s["fallback"] == 0
    assert all(a.route is Route.CLOUD for a in cloud)
    cloud_pred = np.array([a.prediction for a in cloud])
    runner = load_runner(b, threads=1)
    logits = runner.run(b.input_spec.preprocess(x_raw))
    edge_pred = logits.argmax(1)
    r = b.routing
    conf = confidence(logits, measure=r.measure, temperature=r.temperature)
    order = np.argsort(conf)  # least confident first
    curve = []
    for frac in (0.0, 0.02, 0.05, 0.08, 0.10, 0.15, 0.20, 0.30, 0.50, 1.0):
        k = int(round(frac * len(y)))
        pred = edge_pred.copy()
        pred[order[:k]] = cloud_pred[order[:k]]
        curve.append({"offload": k / len(y), "accuracy": float((pred == y).mean())})
    return {
        "summary": s, "edge_accuracy": float((edge_pred == y).mean()),
        "teacher_accuracy": float((cloud_pred == y).mean()), "curve": curve,
    }


def test_cascade_on_the_shared_tiny_run(mosquitto, onnx_bundle, tiny_run, tmp_path):
    """The toolchain's own tiny run and ONNX bundle, through the broker."""
    from toolchain.rundir import RunDir

    x, y = RunDir(tiny_run).splits().test
    m = measure_cascade(mosquitto, onnx_bundle, tiny_run, x, y, tmp_path)
    s = m["summary"]
    print(json.dumps({k: v for k, v in m.items()}, indent=None))
    budget = json.loads((onnx_bundle / "manifest.json").read_text())["routing"]["offload_budget"]
    assert abs(s["offload_rate"] - budget) <= 0.08  # threshold chosen on val for this budget
    assert s["accuracy"] >= m["edge_accuracy"]  # asking the teacher does not make things worse
    accs = [c["accuracy"] for c in m["curve"]]
    assert accs[-1] == pytest.approx(m["teacher_accuracy"])


@pytest.mark.slow
def test_acceptance_default_config_cascade(mosquitto, tmp_path):
    """Acceptance: cascade >= teacher - 0.3 pt at <= 10% offload, default config, through the broker."""
    import os
    from pathlib import Path

    from toolchain import pipeline
    from toolchain.bundle import build_bundle
    from toolchain.config import load_config
    from toolchain.rundir import RunDir

    # EDGE_ACCEPTANCE_RUN: a run dir already trained with the default config (e.g. by `make demo`)
    existing = os.environ.get("EDGE_ACCEPTANCE_RUN")
    run_dir = Path(existing) if existing else tmp_path / "run"
    cfg = load_config(None, overrides=[f"run.dir={run_dir}"])
    if not existing:
        pipeline.run_all(cfg, run_dir, show=False)
    build_bundle(run_dir=run_dir, target="onnx", precision="fp32", out=tmp_path / "bundle", cfg=cfg.build,
                 signing_key=signing_key())
    x, y = RunDir(run_dir).splits().test
    m = measure_cascade(mosquitto, tmp_path / "bundle", run_dir, x, y, tmp_path)
    print(json.dumps(m))
    s = m["summary"]
    assert s["offload_rate"] <= 0.10 + 1e-9
    assert s["accuracy"] >= m["teacher_accuracy"] - 0.003
