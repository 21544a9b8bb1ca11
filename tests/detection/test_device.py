"""A detection bundle on the device: the agent answers with detections (no torch), routes uncertain frames to
the gateway, which answers with the teacher's detections, and telemetry carries the output side (objects per
frame, top score) with drift on both. Built from the tiny `det_run` (tests/fixtures/detection.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.agent.tiny import Listener, items, release_trust, signing_key, wait_for


@pytest.fixture(scope="module")
def det_bundle(det_run, tmp_path_factory) -> Path:
    from tests.detection.test_pipeline import _build_cfg
    from toolchain.bundle import build_bundle

    out = tmp_path_factory.mktemp("det-bundle") / "bundle"
    rep = build_bundle(run_dir=det_run, target="onnx", precision="fp32", cfg=_build_cfg(), out=out,
                       signing_key=signing_key())
    return Path(rep["bundle"])


def _test_split(det_run):
    from toolchain.rundir import RunDir

    return RunDir(det_run).splits().test


def _agent(bundle, tmp_path, **kw):
    from device_agent.agent import Agent, AgentConfig

    return Agent(bundle, AgentConfig(device_id="cam-1", state_dir=tmp_path / "state", threads=1,
                                     trust=release_trust(), **kw))


def test_the_agent_answers_with_the_bundles_detections(det_bundle, det_run, tmp_path):
    """Edge answers are the decoded detections of the runtime's output, one at a time and in batches alike."""
    from edgecore.bundle import open_bundle
    from edgecore.tasks import get_task
    from targets import load_runner

    x, _ = _test_split(det_run)
    x = x[:24]
    b = open_bundle(det_bundle)
    task = get_task(b.manifest.task)
    raw = np.asarray(load_runner(b, threads=1).run(b.input_spec.preprocess(x)))
    want, conf = task.decide(raw, measure=b.routing.measure, temperature=b.routing.temperature, labels=b.labels)

    one = list(_agent(det_bundle, tmp_path / "a", threshold=0.0).run(items(x)))
    batched = list(_agent(det_bundle, tmp_path / "b", threshold=0.0, batch_size=8).run(items(x)))
    assert sum(len(p) for p in want) > 0, "the tiny detector finds nothing: nothing is tested"
    for answers in (one, batched):
        assert [a.route.value for a in answers] == ["edge"] * len(x)
        for a, w, c in zip(answers, want, conf):
            assert [d["class"] for d in a.prediction] == [d["class"] for d in w]
            np.testing.assert_allclose([d["box"] for d in a.prediction] or np.zeros((0, 4)),
                                       [d["box"] for d in w] or np.zeros((0, 4)), atol=0.05)
            assert a.confidence == pytest.approx(float(c), abs=1e-4)
            assert a.label == task.label(a.prediction, b.labels)
            json.dumps(a.to_dict())  # plain JSON: what `device-agent` prints and the feed reads


def test_a_frame_the_device_is_unsure_of_gets_the_teachers_detections(mosquitto, det_bundle, det_run, tmp_path):
    """Through a real broker and gateway (the run's PyTorch teacher): every frame is sent (threshold above 1),
    each answer is the teacher's detections for it, and the telemetry window carries the output side."""
    import torch

    from cloud_gateway.config import CollectionPolicy, GatewayConfig, WorkerConfig
    from cloud_gateway.service import Gateway
    from device_agent.drift import DriftConfig
    from edgecore.samples import Sample
    from edgecore.tasks import get_task
    from toolchain.rundir import RunDir

    x, _ = _test_split(det_run)
    run = RunDir(det_run)
    task = get_task(run.data_record()["task"])
    with torch.inference_mode():
        teacher = run.load_teacher()(torch.from_numpy(np.ascontiguousarray(run.splits().input_spec.preprocess(x))))
    expected = [task.answer(t, run.labels)["detections"] for t in teacher.numpy()]

    user, pw = mosquitto.gateway_credentials
    gcfg = GatewayConfig(worker=WorkerConfig(broker_url=mosquitto.url, username=user, password=pw, batch_ms=2),
                         teacher=str(det_run), db=str(tmp_path / "g.sqlite"), bundles_dir=tmp_path / "bundles",
                         http_port=None, threads=1, trust=release_trust(),
                         collect=CollectionPolicy.parse("all", rate=1.0))
    listener = Listener(mosquitto, ["fleet/cam-1/telemetry"], client_id="det-listener")
    du, dp = mosquitto.credentials("cam-1")
    try:
        with Gateway(gcfg).start() as gw:
            with _agent(det_bundle, tmp_path, broker_url=mosquitto.url, username=du, password=dp, threshold=1.01,
                        deadline_s=5.0, telemetry_window_s=0.3, drift=DriftConfig(min_samples=10)) as agent:
                answers = list(agent.run(items(x)))
                wait_for(lambda: any(b"outputs" in m for _, m in listener.messages), 10, "a window with outputs")
            gw.collector.flush()
            stored = [Sample.from_row(r) for r in gw.store.samples.rows(limit=1000)]
    finally:
        listener.stop()
    assert [a.route.value for a in answers] == ["cloud"] * len(x), [(a.route.value, a.reason) for a in answers]
    for a, want in zip(answers, expected):
        assert [(d["class"], d["label"]) for d in a.prediction] == [(d["class"], d["label"]) for d in want]
        np.testing.assert_allclose([d["box"] for d in a.prediction] or np.zeros((0, 4)),
                                   [d["box"] for d in want] or np.zeros((0, 4)), atol=0.05)
    windows = [json.loads(m) for _, m in listener.messages]
    out = [w["outputs"] for w in windows if "outputs" in w]
    assert sum(o["inputs"] for o in out) == len(x)
    for o in out:
        for name in ("objects", "top_score"):
            assert set(o[name]) >= {"mean", "p50", "p95", "max", "hist"}
            assert all(math.isfinite(v) for k, v in o[name].items() if k != "hist")
    drift = [w["drift"] for w in windows if w.get("drift")]
    assert drift and all({"objects", "top_score", "confidence"} <= set(d) for d in drift), drift
    # every frame collected (rate 1), with the teacher's detections as its answer, queued by their uncertainty
    assert len(stored) == len(x)
    for smp in stored:
        assert smp.teacher_probs.size == 0 and isinstance(smp.teacher_answer["detections"], list)
    assert [smp.teacher_answer["detections"] for smp in stored] == [a.prediction for a in answers]


def test_detection_replies_are_read_strictly():
    """A malformed answer from the gateway is not an answer (the device falls back, reason ``error``)."""
    from edgecore.detect import DecodeParams
    from edgecore.tasks import TaskSpec, get_task

    task = get_task(TaskSpec("detect", DecodeParams((64, 64), (8, 16, 32), 4).to_dict()))
    good = {"box": [1.0, 2.0, 30.5, 40.0], "score": 0.9, "class": 2, "label": "triangle"}
    assert task.read_reply({"ok": True, "detections": [good]}) == [good]
    assert task.read_reply({"ok": True, "detections": []}) == []
    for bad in ({"prediction": 3}, {"detections": "x"}, {"detections": [dict(good, box=[1, 2, 3])]},
                {"detections": [dict(good, box=[5, 2, 3, 40])]}, {"detections": [dict(good, score=1.5)]},
                {"detections": [dict(good, score=float("nan"))]}, {"detections": [dict(good, **{"class": 4})]},
                {"detections": [dict(good, **{"class": True})]}, {"detections": [good] * 101}, {"detections": [7]}):
        assert task.read_reply({"ok": True, **bad}) is None, bad


def test_a_detection_bundle_is_smoke_tested_against_its_tasks_output_shape(det_bundle, tmp_path):
    """The smoke input must come back as ``(1, A, 4 + C)``; a manifest whose decode params promise another
    shape is refused before the bundle serves."""
    import shutil

    from edgecore.bundle import open_bundle
    from edgecore.errors import BundleTrustError
    from edgecore.tasks import get_task
    from targets import load_runner
    from tests.agent.tiny import sign_dir

    b = open_bundle(det_bundle)
    want = get_task(b.manifest.task).output_shape(len(b.labels))
    zero = b.input_spec.preprocess(np.zeros((1, *b.input_spec.sample_shape), np.float32))
    assert np.asarray(load_runner(b, threads=1).run(zero)).shape[1:] == want
    bad = tmp_path / "bad"
    shutil.copytree(det_bundle, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["task"]["params"]["num_classes"] = 7  # promises 4 + 7 channels; the model gives 4 + 4
    (bad / "manifest.json").write_text(json.dumps(m))
    sign_dir(bad)
    with pytest.raises(BundleTrustError, match=r"smoke input with shape \[1, \d+, 8\] \(expected \[1, \d+, 11\]\)"):
        _agent(bad, tmp_path)


def test_the_documented_detection_example_gets_detections(mosquitto, det_run, tmp_path):
    """docs/wire.md's detection block, run as written against a real broker and a detection teacher."""
    import os
    import re
    import shutil
    import subprocess

    from cloud_gateway.config import GatewayConfig, WorkerConfig
    from cloud_gateway.service import Gateway
    from edgecore import wire

    if not (shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")):
        pytest.skip("mosquitto-clients is not installed (apt-get install mosquitto-clients)")
    doc = (Path(__file__).resolve().parents[2] / "docs" / "wire.md").read_text()
    block = re.search(r"<!-- wire-example-detect:start -->\s*```bash\n(.*?)```\s*<!-- wire-example-detect:end -->",
                      doc, re.S)
    assert block, "docs/wire.md lost its wire-example-detect block"
    user, pw = mosquitto.gateway_credentials
    gcfg = GatewayConfig(worker=WorkerConfig(broker_url=mosquitto.url, username=user, password=pw, batch_ms=2),
                         teacher=str(det_run), db=str(tmp_path / "g.sqlite"), bundles_dir=tmp_path / "bundles",
                         http_port=None, threads=1, trust=release_trust())
    with Gateway(gcfg).start() as gw:
        env = {**os.environ, "BROKER_HOST": mosquitto.host, "BROKER_PORT": str(mosquitto.port),
               "DEVICE_PASSWORD": mosquitto.credentials("cam-1")[1]}
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", block.group(1)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        frame = np.zeros((1, 3, 64, 64), np.float32)
        expected = gw.teacher.task.answer(gw.teacher.run(frame)[0], gw.teacher.labels)["detections"]
    assert (tmp_path / "frame.bin").read_bytes() == wire.encode_tensor(frame)
    assert (tmp_path / "frame.bin").stat().st_size == 49176  # the size the doc states
    reply = json.loads(r.stdout.strip().splitlines()[-1])
    assert reply["ok"] is True and bytes.fromhex(reply["correlation"]) == b"frame-1"
    assert [(d["class"], d["label"]) for d in reply["detections"]] == [(d["class"], d["label"]) for d in expected]


def test_the_device_letterboxes_an_image_file_as_training_did(det_bundle, tmp_path):
    """A detector's manifest says its images are letterboxed (aspect kept, grey padding); the agent's folder
    source makes exactly the input the training data loader made of the same file, for any file size."""
    from PIL import Image

    from device_agent.sources import folder_source
    from edgecore.bundle import open_bundle
    from toolchain.detection.formats import read_image

    spec = open_bundle(det_bundle).input_spec
    assert spec.resize == "letterbox" and spec.to_dict()["preprocess"]["resize"] == "letterbox"
    rng = np.random.default_rng(0)
    folder = tmp_path / "cam"
    folder.mkdir()
    for i, (w, h) in enumerate(((80, 48), (30, 90), (64, 64), (200, 120))):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    items = list(folder_source(folder, spec))
    assert len(items) == 4
    for it in items:
        want, _ = read_image(folder / it.id, size=spec.sample_shape[1])
        np.testing.assert_array_equal(it.raw, want.astype(np.float32))

