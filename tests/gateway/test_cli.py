"""``cloud-gateway`` commands a user meets first: ``upload``, the one token variable, a taken HTTP port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from cloud_gateway.api import create_app
from cloud_gateway.metrics import Metrics
from cloud_gateway.service import HttpServer
from cloud_gateway.store import GatewayStore
from tests.agent.tiny import release_trust


def _gateway_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("EDGE_GATEWAY_TOKEN", "GATEWAY_TOKEN")}
    return subprocess.run([sys.executable, "-m", "cloud_gateway.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**base, **(env or {})})


@pytest.fixture
def http_api(tmp_path):
    store = GatewayStore(str(tmp_path / "gw.sqlite"))
    app = create_app(store=store, metrics=Metrics(), bundles_dir=tmp_path / "bundles", token="tok",
                     trust=release_trust())
    (tmp_path / "bundles").mkdir(exist_ok=True)
    server = HttpServer(app, "127.0.0.1", 0, threads=2)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}", tmp_path / "bundles"
    finally:
        server.stop()


def test_upload_puts_a_bundle_with_the_token_from_the_one_variable(http_api, tiny_cascade, tmp_path):
    url, stored = http_api
    tar = tmp_path / "onnx-fp32.tar.gz"
    tar.write_bytes(tiny_cascade.tarball.read_bytes())
    r = _gateway_cli("upload", str(tar), "--gateway", url, "--json", env={"EDGE_GATEWAY_TOKEN": "tok"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["name"] == "onnx-fp32" and (stored / "onnx-fp32.tar.gz").read_bytes() == tar.read_bytes()
    assert r.stderr == ""  # the current name: no warning
    with urllib.request.urlopen(out["url"], timeout=10) as resp:  # downloadable where it says
        assert resp.read() == tar.read_bytes()
    # the gateway's old variable still works, with one warning naming the new one
    r = _gateway_cli("upload", str(tar), "--gateway", url, "--name", "again", env={"GATEWAY_TOKEN": "tok"})
    assert r.returncode == 0, r.stderr
    assert "$GATEWAY_TOKEN is deprecated" in r.stderr and "EDGE_GATEWAY_TOKEN" in r.stderr
    assert (stored / "again.tar.gz").is_file()
    # what a user gets wrong: one line each, exit 2
    r = _gateway_cli("upload", str(tar), "--gateway", url)
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: uploading a bundle needs the gateway's write token: --token or $EDGE_GATEWAY_TOKEN"), r.stderr
    r = _gateway_cli("upload", str(tar), "--gateway", url, "--token", "wrong")
    assert r.returncode == 2 and "answered 401: missing or wrong token" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _gateway_cli("upload", str(tiny_cascade.bundle_dir), "--gateway", url, "--token", "tok")
    assert r.returncode == 2 and "is a bundle folder: upload its .tar.gz" in r.stderr
    bad = tmp_path / "junk.tar.gz"
    bad.write_bytes(b"not a bundle")
    r = _gateway_cli("upload", str(bad), "--gateway", url, "--token", "tok")
    assert r.returncode == 2 and "answered 400: not a valid bundle" in r.stderr
    assert not (stored / "junk.tar.gz").exists()
    # `rollout start FILE` uploads through the same code first (this API has no rollout manager: one line)
    r = _gateway_cli("rollout", "start", str(tar), "--gateway", url, "--canary", "dev-a", env={"EDGE_GATEWAY_TOKEN": "tok"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (stored / "onnx-fp32.tar.gz").is_file()


def test_every_command_reads_the_token_through_the_one_lookup(monkeypatch, capsys):
    import edgecore.clikit as clikit

    monkeypatch.setattr(clikit, "_warned_old_token", False)
    monkeypatch.delenv("EDGE_GATEWAY_TOKEN", raising=False)
    monkeypatch.delenv("GATEWAY_TOKEN", raising=False)
    assert clikit.gateway_token() is None and clikit.gateway_token("flag") == "flag"
    monkeypatch.setenv("GATEWAY_TOKEN", "old")
    assert clikit.gateway_token() == "old" and clikit.gateway_token() == "old"
    assert capsys.readouterr().err.count("deprecated") == 1  # once per process
    monkeypatch.setenv("EDGE_GATEWAY_TOKEN", "new")
    assert clikit.gateway_token() == "new" and clikit.gateway_token("flag") == "flag"
    # nothing outside the lookup reads either variable (toolchain/refresh.py aside, named below)
    root = Path(__file__).resolve().parents[2]
    readers = []
    for pkg in ("edgecore", "device_agent", "cloud_gateway", "hw_bench", "toolchain", "edge_demo"):
        for f in (root / pkg).rglob("*.py"):
            text = f.read_text()
            if ("environ" in text and ("GATEWAY_TOKEN" in text or "TOKEN_ENV" in text)
                    and f.relative_to(root).as_posix() not in ("edgecore/clikit.py", "toolchain/refresh.py")):
                readers.append(f.relative_to(root).as_posix())
    assert readers == [], f"read the token through edgecore.clikit.gateway_token: {readers}"


@pytest.mark.broker
def test_a_taken_http_port_is_one_line_naming_the_port_and_the_flag(mosquitto, tiny_cascade, tmp_path):
    user, pw = mosquitto.gateway_credentials
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = _gateway_cli("serve", "--broker", mosquitto.url, "--username", user, "--password", pw, "--teacher",
                         str(tiny_cascade.teacher_onnx), "--db", str(tmp_path / "gw.sqlite"),
                         "--http-host", "127.0.0.1", "--http-port", str(port))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: HTTP port {port} on 127.0.0.1 is already in use (another gateway?): choose another with "
        "--http-port (0: any free port; -1: no HTTP API)"], r.stderr
