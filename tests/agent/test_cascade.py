"""End to end on digits through a real Mosquitto: agent (student) + gateway (teacher)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from device_agent.agent import Route, summarize
from tests.agent.tiny import make_agent, items, start_gateway

pytestmark = pytest.mark.broker


def test_cascade_accuracy_and_offload(mosquitto, tiny_cascade, tmp_path):
    run = tiny_cascade
    import onnxruntime as ort

    def acc(path):
        s = ort.InferenceSession(str(path))
        return float((s.run(None, {"input": run.spec.preprocess(run.x_test)})[0].argmax(1) == run.y_test).mean())

    edge_acc, teacher_acc = acc(run.student_onnx), acc(run.teacher_onnx)
    with start_gateway(mosquitto, run, tmp_path) as gw:
        with make_agent(mosquitto, run.bundle_dir, "dev-a", tmp_path, deadline_s=2.0) as agent:
            answers = list(agent.run(items(run.x_test, run.y_test)))
    s = summarize(answers)
    print(f"edge-only {edge_acc:.4f} teacher {teacher_acc:.4f} cascade {s['accuracy']:.4f} "
          f"offload {s['offload_rate']:.3f} fallbacks {s['fallback']}")
    assert len(answers) == len(run.x_test)
    assert s["fallback"] == 0 and s["cloud"] > 0
    assert 0.04 <= s["offload_rate"] <= 0.18  # threshold chosen for 10% on val
    assert s["accuracy"] >= edge_acc  # the cloud fixes more than it breaks
    assert s["accuracy"] >= teacher_acc - 0.01
    assert gw.worker.served == s["cloud"]
    # every cloud answer is the teacher's prediction for that input
    sess = ort.InferenceSession(str(run.teacher_onnx))
    t_pred = sess.run(None, {"input": run.spec.preprocess(run.x_test)})[0].argmax(1)
    for a in answers:
        if a.route is Route.CLOUD:
            assert a.prediction == t_pred[int(a.id)]
