"""Labelling detection frames: the gateway stores the teacher's detections with a collected frame, the queue
serves them, a person accepts or rejects each box (API and dashboard), and the boxes kept are the sample's
answer (`edgecore.samples.Sample.answer`)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.agent.tiny import release_trust

pytestmark = pytest.mark.broker


def _gateway(mosquitto, det_run, tmp_path):
    from cloud_gateway.config import GatewayConfig, WorkerConfig
    from cloud_gateway.service import Gateway

    user, pw = mosquitto.gateway_credentials
    return Gateway(GatewayConfig(
        worker=WorkerConfig(broker_url=mosquitto.url, username=user, password=pw), teacher=str(det_run),
        db=str(tmp_path / "g.sqlite"), bundles_dir=tmp_path / "bundles", http_port=0, token="test-token", threads=1,
        trust=release_trust())).start()


def _collect(gw, frames: np.ndarray) -> list[dict]:
    """Frames through the teacher and the collector, as the worker does for a collected request."""
    from cloud_gateway.collection import SampleCollector
    from cloud_gateway.config import CollectionPolicy
    from cloud_gateway.metrics import Metrics

    col = SampleCollector(gw.store, CollectionPolicy.parse("all"), Metrics(), task=gw.teacher.task).start()
    answers = [gw.teacher.task.answer(out, gw.teacher.labels) for out in gw.teacher.run(frames)]
    for x, a in zip(frames, answers):
        col.offer("cam-1", x[None], a, confidence=0.2, flagged=True)
    col.flush()
    col.stop()
    return answers


def _call(gw, method: str, path: str, body=None):
    req = urllib.request.Request(gw.http_url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer test-token", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _frames(det_run, n: int) -> np.ndarray:
    from toolchain.rundir import RunDir

    run = RunDir(det_run)
    x = run.splits().test[0][:n]
    return run.splits().input_spec.preprocess(x).astype(np.float32)


def test_a_person_keeps_some_of_the_teachers_boxes(mosquitto, det_run, tmp_path):
    from edgecore.samples import Sample, SamplePage

    with _gateway(mosquitto, det_run, tmp_path) as gw:
        answers = _collect(gw, _frames(det_run, 12))
        code, page = _call(gw, "GET", "/api/labels/queue?min_uncertainty=0&limit=50")
        assert code == 200
        queue = SamplePage.from_json(page).samples
        assert len(queue) == 12 and all(s.teacher_answer is not None for s in queue)
        assert sorted(json.dumps(s.teacher_answer["detections"], sort_keys=True) for s in queue) == sorted(
            json.dumps(a["detections"], sort_keys=True) for a in answers)
        s = next(s for s in queue if len(s.teacher_answer["detections"]) >= 2)
        dets = s.teacher_answer["detections"]
        code, body = _call(gw, "POST", f"/api/samples/{s.id}/label", {"accept": [1]})
        assert code == 200 and body["human_answer"]["detections"] == [dets[1]]
        assert body["human_answer"]["rejected"] == [0, *range(2, len(dets))]
        again = Sample.from_row(gw.store.samples.get(s.id))
        assert again.answer["detections"] == [dets[1]] and again.teacher_answer["detections"] == dets
        # a labelled frame leaves the queue; the refused forms say what to send
        code, page = _call(gw, "GET", "/api/labels/queue?min_uncertainty=0&limit=50")
        assert s.id not in [q.id for q in SamplePage.from_json(page).samples]
        for bad, why in (({"accept": [len(dets)]}, "accept: expected distinct indices"),
                         ({"accept": [0, 0]}, "accept: expected distinct indices"),
                         ({"accept": "0"}, "accept: expected distinct indices"),
                         ({"label": 1}, "its teacher answer is detections")):
            code, body = _call(gw, "POST", f"/api/samples/{s.id}/label", bad)
            assert code == 400 and why in body["error"], (bad, body)
        code, body = _call(gw, "POST", "/api/samples/999999/label", {"accept": []})
        assert code == 404


def test_the_dashboard_draws_the_boxes_and_saves_what_a_person_keeps(mosquitto, det_run, tmp_path):
    from playwright.sync_api import sync_playwright

    from edgecore.samples import Sample
    from tests.gateway.test_dashboard import _chromium, _page

    exe = _chromium()
    with _gateway(mosquitto, det_run, tmp_path) as gw:
        _collect(gw, _frames(det_run, 6))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
            try:
                page, errors = _page(browser, gw.http_url)
                page.goto(gw.http_url + "/")
                page.fill("#token", "test-token")
                page.evaluate("document.getElementById('load-queue').click()")
                page.wait_for_selector("#queue .sample.detection", timeout=15000)
                cards = page.locator("#queue .sample.detection")
                card = next(cards.nth(i) for i in range(cards.count())
                            if cards.nth(i).locator("input[type=checkbox]").count() >= 2)
                sid = int(card.get_attribute("data-id") or 0)
                assert card.locator("canvas").count() == 1 and "teacher found" in card.inner_text()
                boxes = card.locator("input[type=checkbox]")
                for i in range(boxes.count()):
                    boxes.nth(i).set_checked(i == 0)  # keep the first box only
                card.locator("button.save").click()
                page.wait_for_selector(f".sample.labelled[data-id='{sid}']", timeout=5000)
                assert errors == []
            finally:
                browser.close()
        s = Sample.from_row(gw.store.samples.get(sid))
    assert s.human_answer["accepted"] == [0] and s.answer["detections"] == s.teacher_answer["detections"][:1]
