"""The HTTP API for a fleet of thousands: a paged, sorted, filtered device list, the fleet summary, the dashboard's
one aggregated poll and /metrics per model line (Flask's test client over a SQLite store; no broker)."""

from __future__ import annotations

import json
import time

import pytest

from cloud_gateway.api import create_app
from cloud_gateway.metrics import Metrics
from cloud_gateway.store import GatewayStore
from tests.agent.tiny import release_trust

N = 2000


def fill(store: GatewayStore, n: int = N) -> None:
    """``n`` devices of two model lines, a third offline, every seventh drifting, d00005 without telemetry."""
    store.devices.set_statuses([(f"d{i:05d}", {"state": "offline" if i % 3 == 0 else "online",
                                               "model": "digits" if i % 2 else "parts", "version": str(1 + i % 2),
                                               "bundle_sha256": f"{i % 2:064x}", "pad": "x" * 600})
                                for i in range(n)])
    store.telemetry.add_many([(f"d{i:05d}", {
        "schema": 1, "seq": 1, "boot": "b", "t_end": time.time(), "offload_rate": (i % 100) / 100,
        "fallback_rate": 0.01, "counts": {"inputs": 50}, "drift": {"flag": i % 7 == 0},
        "latency": {"edge": {"p95": (i % 1000 + 1) / 1e5}, "cloud_rtt": {"p95": 0.02}}}) for i in range(n) if i != 5])


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet-api")
    store = GatewayStore(tmp / "g.sqlite")
    fill(store)
    metrics = Metrics()
    for i in range(N):
        metrics.note_line(f"d{i:05d}", "digits" if i % 2 else "parts")
        metrics.inc("gateway_telemetry_windows_total", "Telemetry windows stored", device=f"d{i:05d}")
    app = create_app(store=store, metrics=metrics, bundles_dir=tmp / "b", token="tok", trust=release_trust())
    return app.test_client()


def _get(client, url: str):  # type: ignore[no-untyped-def]
    r = client.get(url)
    assert r.status_code == 200, (url, r.data[:300])
    return json.loads(r.data)


def test_the_device_list_is_paged_and_every_device_comes_once(client):
    first = client.get("/api/devices")
    assert len(first.data) < 150_000  # a page, not the fleet (the whole list was 8.2 MB at 5,000 devices)
    page = json.loads(first.data)
    assert page["total"] == N and len(page["devices"]) == 50 and page["next_cursor"]
    seen, cursor = [], None
    while True:
        page = _get(client, "/api/devices?limit=500&sort=-offload_rate" + (f"&cursor={cursor}" if cursor else ""))
        seen += [(d["device_id"], d["offload_rate"]) for d in page["devices"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == N and len({d for d, _ in seen}) == N
    rates = [r if r is not None else -1 for _, r in seen]
    assert rates == sorted(rates, reverse=True)


def test_the_device_list_filters(client):
    assert _get(client, "/api/devices?state=offline")["total"] == len(range(0, N, 3))
    drifting = _get(client, "/api/devices?drifting=1&limit=500")
    assert drifting["total"] == len(range(0, N, 7)) and all(d["drift_flag"] for d in drifting["devices"])
    digits_online = _get(client, "/api/devices?line=digits&state=online&limit=500")
    assert digits_online["total"] == sum(1 for i in range(N) if i % 2 and i % 3)
    assert all(d["model_line"] == "digits" and d["state"] == "online" for d in digits_online["devices"])
    assert _get(client, "/api/devices?bundle=2")["total"] == N // 2
    assert _get(client, f"/api/devices?bundle={1:064x}")["total"] == N // 2
    assert [d["device_id"] for d in _get(client, "/api/devices?q=d0199")["devices"]] == [
        f"d0199{i}" for i in range(10)]
    for bad in ("sort=status", "state=asleep", "drifting=maybe", "cursor=!!", "limit=many"):
        r = client.get(f"/api/devices?{bad}")
        assert r.status_code == 400 and json.loads(r.data)["ok"] is False, bad


def test_fleet_summary_is_counts_rates_and_percentiles_per_line_and_version(client):
    s = _get(client, "/api/fleet/summary")
    assert (s["devices"], s["online"], s["offline"]) == (N, N - len(range(0, N, 3)), len(range(0, N, 3)))
    assert s["drifting"] == len(range(0, N, 7))
    assert s["offload_rate"] == pytest.approx(sum((i % 100) / 100 for i in range(N) if i != 5) / (N - 1))
    assert set(s["latency"]["edge_p95"]) == {"p50", "p95", "p99"}
    assert s["latency"]["edge_p95"]["p50"] < s["latency"]["edge_p95"]["p95"] <= s["latency"]["edge_p95"]["p99"]
    groups = {(g["model_line"], g["version"]): g for g in s["groups"]}
    assert set(groups) == {("parts", "1"), ("digits", "2")} and groups[("digits", "2")]["devices"] == N // 2


def test_the_dashboard_poll_is_one_request_with_everything(client):
    d = _get(client, "/api/fleet/dashboard?limit=25&sort=-edge_p95&state=online")
    assert set(d) >= {"summary", "page", "rollouts"} and d["summary"]["devices"] == N
    assert len(d["page"]["devices"]) == 25 and all(x["state"] == "online" for x in d["page"]["devices"])


def test_metrics_are_per_model_line_with_the_fleet_gauges(client):
    text = client.get("/metrics").data.decode()
    assert 'gateway_telemetry_windows_total{line="digits"} 1000' in text
    assert 'fleet_devices{line="digits",version="2",state="online"}' in text
    assert 'fleet_drifting_devices{line="parts",version="1"}' in text and "fleet_offload_rate{" in text
    assert "device=" not in text and len(text.splitlines()) < 100


def test_the_summary_is_computed_once_a_second_for_every_reader(tmp_path, monkeypatch):
    """Dashboards and /metrics scrapes share one summary a second: readers do not multiply the aggregate scans."""
    store = GatewayStore(tmp_path / "g.sqlite")
    fill(store, 20)
    calls = []
    real = store.devices.summary
    monkeypatch.setattr(store.devices, "summary", lambda: (calls.append(1), real())[1])
    c = create_app(store=store, metrics=Metrics(), bundles_dir=tmp_path / "b", token="tok",
                   trust=release_trust()).test_client()
    for url in ("/api/fleet/summary", "/api/fleet/dashboard", "/metrics", "/api/fleet/summary"):
        assert c.get(url).status_code == 200
    assert len(calls) == 1
    time.sleep(1.1)
    assert _get(c, "/api/fleet/summary")["devices"] == 20 and len(calls) == 2


def test_a_device_page_carries_its_hourly_rows_when_asked(tmp_path):
    store = GatewayStore(tmp_path / "g.sqlite")
    store.telemetry.add_many([("d1", {"schema": 1, "seq": i, "boot": "b", "t_end": 3600.0 * 10 + i,
                                      "offload_rate": 0.5, "counts": {"inputs": 4}}) for i in range(3)])
    store.telemetry.delete_before(3600.0 * 10 + 2)
    c = create_app(store=store, metrics=Metrics(), bundles_dir=tmp_path / "b", token="tok",
                   trust=release_trust()).test_client()
    one = _get(c, "/api/devices/d1?hourly=48")
    assert [h["windows"] for h in one["hourly"]] == [2] and one["hourly"][0]["offload_rate"] == 0.5
    assert "hourly" not in _get(c, "/api/devices/d1") and [w["seq"] for w in one["history"]] == [2]
    assert c.get("/api/devices/d1?hourly=x").status_code == 400
