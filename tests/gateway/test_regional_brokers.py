"""The regional-broker layout: devices split across two Mosquitto brokers, each bridged (MQTT 5) to the core
broker the gateway subscribes to; processes stand in for the machines. Every path crosses a bridge: a device's
uncertain inputs answered by the gateway (the request's response topic and correlation data survive the
bridge), its telemetry stored and acknowledged, its status seen, a gateway command delivered."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from cloud_gateway.broker import Bridge, find_mosquitto
from cloud_gateway.broker import MosquittoBroker as ProductBroker
from device_agent.agent import Route
from tests.agent.tiny import items, make_agent, start_gateway, wait_for
from tests.fixtures.broker import CredentialsMixin, known_credentials


class _Broker(CredentialsMixin, ProductBroker):
    pass


@pytest.fixture
def regions(tmp_path):
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    creds = known_credentials()
    core = _Broker(tmp_path / "core", creds)
    core.start()
    admin_user, admin_pw = creds.admin
    made = [core]
    try:
        for name in ("region-1", "region-2"):
            r = _Broker(tmp_path / name, creds, bridge=Bridge(name, core.host, core.port, admin_user, admin_pw))
            r.start()
            made.append(r)
        yield core, made[1], made[2]
    finally:
        for b in made:
            b.stop()


def _command(url: str, device: str, body: dict) -> None:
    req = urllib.request.Request(f"{url}/api/devices/{device}/cmd", method="POST", data=json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer test-token", "Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()


def test_devices_on_two_bridged_regional_brokers_reach_the_gateway_on_the_core(regions, tiny_cascade, tmp_path: Path):
    core, r1, r2 = regions
    run = tiny_cascade
    with start_gateway(core, run, tmp_path / "gw") as gw:
        agents = {"dev-a": make_agent(r1, run.bundle_dir, "dev-a", tmp_path, threshold=1.01, deadline_s=5.0),
                  "dev-b": make_agent(r2, run.bundle_dir, "dev-b", tmp_path, threshold=1.01, deadline_s=5.0)}
        try:
            for a in agents.values():
                a.start()
            wait_for(lambda: all(((gw.store.devices.get(d) or {}).get("status") or {}).get("state") == "online"
                                 for d in agents), 20, "both statuses through the bridges")
            for d, a in agents.items():
                answers = list(a.run(items(run.x_test[:20])))
                routes = [x.route for x in answers]
                assert routes == [Route.CLOUD] * 20, (d, [(x.route, x.reason) for x in answers][:3])
            wait_for(lambda: all(gw.store.telemetry.history(d, limit=1) for d in agents), 20, "telemetry stored")
            wait_for(lambda: all(len(a.fleet.outbox) == 0 for a in agents.values()), 20,
                     "every window acknowledged back through the bridges")
            _command(gw.http_url, "dev-b", {"cmd": "set_threshold", "threshold": 0.42, "id": "via-bridge"})
            wait_for(lambda: agents["dev-b"].threshold == 0.42, 20, "the gateway's command through region-2")
            assert agents["dev-a"].threshold == 1.01  # addressed to dev-b only
        finally:
            for a in agents.values():
                a.stop()
