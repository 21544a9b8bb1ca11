"""The fleet dashboard in a real headless Chromium: devices, charts, the drifted one flagged."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.agent.tiny import items, make_agent, start_gateway

pytestmark = [pytest.mark.browser, pytest.mark.broker]


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return exe


def _page(browser, base: str):  # type: ignore[no-untyped-def]
    """A page that records script errors, CSP violations (logged, not thrown) and requests leaving the gateway."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text)
            if m.type == "error" or "Content Security Policy" in m.text else None)
    page.on("request", lambda r: errors.append(f"external request {r.url}") if not r.url.startswith(base) else None)
    return page, errors


def test_dashboard_shows_devices_charts_and_flags_drift(mosquitto, tiny_cascade, tmp_path):
    exe = _chromium()
    from playwright.sync_api import sync_playwright

    from device_agent.drift import DriftConfig

    run = tiny_cascade
    with start_gateway(mosquitto, run, tmp_path) as gw:
        drift = DriftConfig(min_samples=50, window=200)
        with make_agent(mosquitto, run.bundle_dir, "dev-a", tmp_path, drift=drift) as a, \
                make_agent(mosquitto, run.bundle_dir, "dev-b", tmp_path, drift=drift) as b:
            for i in range(4):  # several telemetry windows of each
                chunk = run.x_test[i * 90:(i + 1) * 90]
                list(a.run(items(chunk)))
                list(b.run(items(chunk * 0.4)))  # a fading sensor: inputs drift
                time.sleep(0.25)
        assert a.last_drift and a.last_drift["flag"] is False
        assert b.last_drift and b.last_drift["flag"] is True
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
            try:
                page, errors = _page(browser, gw.http_url)
                page.goto(gw.http_url + "/")
                page.wait_for_selector("body[data-loaded='1']", timeout=15000)
                assert page.locator("#devices tr.device").count() == 2
                dev_a = page.locator("#devices .device[data-id='dev-a']")
                dev_b = page.locator("#devices .device[data-id='dev-b']")
                assert dev_b.locator(".drift-flag").count() == 1 and dev_a.locator(".drift-flag").count() == 0
                assert "drifted" in (dev_b.get_attribute("class") or "")
                assert "offline" in dev_a.locator(".state").inner_text()
                assert "1 drifted" in page.locator("#summary").inner_text()
                assert page.locator("#fleet .tile").count() >= 6 and page.locator("#groups tr.group").count() >= 1
                assert page.locator("#fleet svg").count() == 0  # no per-device chart on the fleet view
                fleet_shot = Path(os.environ.get("EDGE_TEST_ARTIFACTS", tmp_path)) / "dashboard-fleet.png"
                fleet_shot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(fleet_shot), full_page=True)
                for dev in ("dev-a", "dev-b"):  # a device's charts are on its own page
                    page.click(f"#devices .device[data-id='{dev}'] a")
                    card = page.locator(f"#device-page .device[data-id='{dev}']")
                    card.wait_for(timeout=10000)
                    assert page.locator("#fleet-view").is_hidden()
                    assert card.locator("svg").count() == 3  # latency, offload, drift over time
                    pts = card.locator("svg.drift polyline").get_attribute("points") or ""
                    assert len(pts.split()) >= 2  # a line over several windows
                    assert (card.locator("svg.offload polyline").first.get_attribute("points") or "").strip()
                    page.click("#back")
                    page.locator("#devices tr.device").first.wait_for(timeout=10000)
                assert errors == []
                # What a person would see, kept for review (EDGE_TEST_ARTIFACTS=DIR keeps it past the run).
                shot = Path(os.environ.get("EDGE_TEST_ARTIFACTS", tmp_path)) / "dashboard.png"
                shot.parent.mkdir(parents=True, exist_ok=True)
                page.set_viewport_size({"width": 1280, "height": 900})
                page.goto(gw.http_url + "/#device=dev-b")
                page.locator("#device-page .device[data-id='dev-b'] svg").first.wait_for(timeout=10000)
                page.screenshot(path=str(shot), full_page=True)
                assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
            finally:
                browser.close()


def test_dashboard_labelling_queue_and_rollout_timeline(mosquitto, tiny_cascade, tmp_path):
    exe = _chromium()
    import numpy as np
    from playwright.sync_api import sync_playwright

    from cloud_gateway.collection import SampleCollector
    from cloud_gateway.config import CollectionPolicy
    from cloud_gateway.metrics import Metrics

    run = tiny_cascade
    with start_gateway(mosquitto, run, tmp_path) as gw:
        col = SampleCollector(gw.store, CollectionPolicy.parse("all"), Metrics()).start()
        x = run.spec.preprocess(run.x_test[:3])
        for i, probs in enumerate(([0.5, 0.5] + [0.0] * 8, [0.4, 0.3, 0.3] + [0.0] * 7, [0.95] + [0.05 / 9] * 9)):
            col.offer("dev-a", x[i], probs, confidence=0.3, flagged=True)
        col.flush()
        col.stop()
        rid = gw.store.rollouts.create("v2", {"canaries": ["dev-a"], "rest": [], "watch_s": 5,
                                             "promote_if": "rollbacks == 0", "previous": {}, "manifest_sha256": "x"}, None)
        gw.store.rollouts.add_step(rid, "started", {})
        gw.store.rollouts.add_step(rid, "canaries updated", {})
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
            try:
                page, errors = _page(browser, gw.http_url)
                page.goto(gw.http_url + "/")
                page.wait_for_selector(f".rollout[data-id='{rid}']", timeout=15000)
                steps = page.locator(f".rollout[data-id='{rid}'] li").all_inner_texts()
                assert [s.endswith(w) for s, w in zip(steps, ("started", "canaries updated"))] == [True, True]
                page.fill("#token", "test-token")
                page.click("#load-queue")
                page.wait_for_selector("#queue .sample", timeout=10000)
                cards = page.locator("#queue .sample")
                assert cards.count() == 2  # the confident one is not queued
                assert cards.first.locator("canvas").count() == 1 and "teacher says" in cards.first.inner_text()
                first = int(cards.first.get_attribute("data-id") or 0)
                cards.first.locator("button[data-label='7']").click()
                page.wait_for_selector(f".sample.labelled[data-id='{first}']", timeout=5000)
                assert errors == []
            finally:
                browser.close()
        row = next(r for r in gw.store.samples.rows(limit=10) if r["id"] == first)
        assert row["human_label"] == 7
        assert np.isfinite(row["uncertainty"])


def _until(page, pred, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``pred`` from Python (the page's CSP forbids the string evaluation wait_for_function uses)."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        page.wait_for_timeout(100)


def test_dashboard_for_a_fleet_of_thousands_one_poll_at_a_time(tmp_path):
    """2,000 devices: the dashboard renders the summary and one page, asks ONE request per refresh, never starts a
    poll before the previous one answered (even when answers take longer than the refresh period), and sorts,
    filters and pages on the server."""
    exe = _chromium()
    from playwright.sync_api import sync_playwright

    from cloud_gateway.api import create_app
    from cloud_gateway.metrics import Metrics
    from cloud_gateway.service import HttpServer
    from cloud_gateway.store import GatewayStore
    from tests.agent.tiny import release_trust
    from tests.gateway.test_fleet_api import N, fill

    store = GatewayStore(tmp_path / "g.sqlite")
    fill(store)
    app = create_app(store=store, metrics=Metrics(), bundles_dir=tmp_path / "b", token="tok", trust=release_trust())
    server = HttpServer(app, "127.0.0.1", 0)
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
            try:
                page, errors = _page(browser, base)
                api: list[tuple[str, float, str]] = []  # (event, time, url) of every API request
                page.on("request", lambda r: api.append(("start", time.monotonic(), r.url)) if "/api/" in r.url else None)
                page.on("requestfinished", lambda r: api.append(("end", time.monotonic(), r.url))
                        if "/api/" in r.url else None)
                t0 = time.monotonic()
                page.goto(base + "/")
                page.wait_for_selector("body[data-loaded='1']", timeout=15000)
                assert time.monotonic() - t0 < 10
                assert page.locator("#devices tr.device").count() == 50
                assert f"{N} devices" in page.locator("#summary").inner_text()
                assert page.locator("#page-info").inner_text().startswith(f"1–50 of {N}")
                first = [r for r in api if r[0] == "start"]
                assert len(first) == 1 and "/api/fleet/dashboard" in first[0][2]  # one request, not one per device

                page.click("#next-page")
                _until(page, lambda: page.locator("#page-info").inner_text().startswith("51–100"), "page 2")
                assert page.locator("#devices tr.device").first.get_attribute("data-id") == "d00050"
                page.select_option("#f-state", "offline")
                _until(page, lambda: page.locator("#page-info").inner_text().endswith(f"of {len(range(0, N, 3))}"),
                       "the offline filter")
                assert set(page.locator("#devices tr.device .state").all_inner_texts()) == {"offline"}
                page.click("#devices th[data-sort='edge_p95']")
                page.click("#devices th[data-sort='edge_p95']")  # twice: descending
                page.wait_for_selector("#devices th.sorted-desc[data-sort='edge_p95']")
                _until(page, lambda: page.locator("#devices tr.device").first.get_attribute("data-id") == "d00999",
                       "the slowest offline device first")

                # a slow gateway (answers after 4.5 s, longer than the 3 s refresh): polls wait, they never overlap
                page.route("**/api/fleet/dashboard*", lambda route: (time.sleep(4.5), route.continue_()))
                api.clear()
                time.sleep(12)
                page.unroute("**/api/fleet/dashboard*")
                inflight, most = 0, 0
                for ev, _, _ in sorted(api, key=lambda r: r[1]):
                    inflight += 1 if ev == "start" else -1
                    most = max(most, inflight)
                assert most == 1, api
                assert all("/api/fleet/dashboard" in u for _, _, u in api)
                assert errors == []
            finally:
                browser.close()
    finally:
        server.stop()
