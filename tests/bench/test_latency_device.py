"""prune.latency_device = a fleet device id: each candidate is timed by a real agent's bench command over Mosquitto."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgecore.errors import ConfigError
from tests.bench.test_fleet import _wait_online
from tests.fixtures.pipeline import tiny_config
from toolchain import pipeline

pytestmark = pytest.mark.broker


def _key_file(tmp: Path) -> Path:
    from cryptography.hazmat.primitives import serialization

    from tests.agent.tiny import signing_key

    p = tmp / "release.key"
    p.write_bytes(signing_key().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    p.chmod(0o600)  # a private key others can read is refused, as ssh does
    return p


def test_latency_search_times_every_candidate_on_the_fleet_device(mosquitto, tiny_run, tmp_path):  # type: ignore[no-untyped-def]
    from tests.agent.tiny import bench_commands, build_tiny, command_key_paths, make_agent

    tiny = build_tiny(tmp_path / "tiny")
    agent = make_agent(mosquitto, tiny.bundle_dir, "dev-a", tmp_path, commands=bench_commands(),
                       bench_dirs=(tmp_path / "share",)).start()  # the shared mount the device takes bundles from
    user, pw = mosquitto.admin_credentials
    (tmp_path / "operator.json").write_text(json.dumps({"username": user, "password": pw}))
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    prune = {"target": "latency", "latency_budget_ms": 1e4, "latency_step": 0.3, "latency_max_candidates": 1,
             "latency_extra_steps": 1, "finetune_epochs": 1, "latency_device": "dev-a",
             "latency_broker": mosquitto.url, "latency_credentials": str(tmp_path / "operator.json"),
             "latency_share_dir": str(tmp_path / "share"), "latency_sign_key": str(_key_file(tmp_path)),
             "latency_deadline_s": 60.0, "latency_command_key": str(command_key_paths()[0])}
    (tmp_path / "share").mkdir()
    try:
        _wait_online(mosquitto, ["dev-a"])
        cfg = tiny_config(run_dir, prune=prune, compress={"passes": ["prune"], "control": "none"})
        s = pipeline.compress(cfg, run_dir, show=False)["prune"]["latency"]
    finally:
        agent.stop()
    assert s["device"] == "dev-a" and s["built_and_measured"] == 2
    assert all(c["p50_ms"] > 0 and not c["cached"] for c in s["candidates"])
    assert list((tmp_path / "share").iterdir()) == []  # candidate bundles are cleaned up after each measurement
    assert json.loads((run_dir / "latency" / "cache.json").read_text())  # keyed by artifact sha256 and device


def test_a_fleet_device_needs_a_broker_and_a_way_to_ship_candidates(tmp_path):
    base = {"target": "latency", "latency_budget_ms": 1.0, "latency_device": "dev-7"}
    with pytest.raises(ConfigError, match="latency_broker: is required to measure on fleet device 'dev-7'"):
        tiny_config(tmp_path, prune=base)
    with pytest.raises(ConfigError, match="latency_gateway: or latency_share_dir is required"):
        tiny_config(tmp_path, prune={**base, "latency_broker": "mqtt://localhost:1883"})
