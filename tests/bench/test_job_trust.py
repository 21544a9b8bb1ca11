"""The agent's ``bench`` command obeys the same trust as an update.

Only bundles that verify against the device's trusted keys run; bundles and test data come only from URLs on the
update allow-list (or, for bundles, from what the device holds, named by sha256), never from a path on the
device; downloads are bounded in size and time and leave no file behind; and the error in the device's status
says what failed, never what the device's disk or network look like.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import hw_bench.job as job_mod
from device_agent.agent import Agent, AgentConfig
from edgecore.bundle import SIGNATURE
from hw_bench.data import TestData, save_npz
from tests.agent.tiny import release_trust, retag_bundle

JOB = {"schema": 1, "cmd": "bench", "job_id": "j1", "scenario": "single-stream", "duration_s": 0.05,
       "min_queries": 5, "warmup": 1, "threads": 1, "accuracy": False}


class _Server:
    """A real HTTP server over a folder, plus ``/big`` (an endless body, no length), ``/big-declared`` (a body
    that declares 1 GiB) and ``/slow`` (a byte every 0.2 s). ``sent`` counts the body bytes it wrote."""

    def __init__(self, root: Path) -> None:
        server = self
        self.sent = 0

        class H(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):  # type: ignore[no-untyped-def]
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self):  # type: ignore[no-untyped-def]
                if self.path in ("/big", "/big-declared", "/slow"):
                    self.send_response(200)
                    if self.path == "/big-declared":
                        self.send_header("Content-Length", str(1 << 30))
                    self.end_headers()
                    block = b"\0" * (1 << 16) if self.path != "/slow" else b"\0"
                    try:
                        for _ in range(1 << 14):
                            self.wfile.write(block)
                            server.sent += len(block)
                            if self.path == "/slow":
                                time.sleep(0.2)
                    except OSError:
                        pass
                    return
                super().do_GET()

            def log_message(self, *a):  # type: ignore[no-untyped-def]
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _tar(src: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tf:
        tf.add(src, arcname=src.name)
    return out


def _other_key_sign(bundle_dir: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgecore.signing import sign

    (bundle_dir / SIGNATURE).write_bytes(sign((bundle_dir / "manifest.json").read_bytes(),
                                              Ed25519PrivateKey.generate()))


@pytest.fixture
def served(tiny_cascade, tmp_path):  # type: ignore[no-untyped-def]
    """A server with a trusted, an unsigned and a foreign-signed bundle and the test data; an agent whose update
    allow-list is that server."""
    run = tiny_cascade
    www = tmp_path / "www"
    www.mkdir()
    good = retag_bundle(run.bundle_dir, tmp_path / "good", version="7")
    shutil.copy(good, www / "good.tar.gz")
    unsigned = tmp_path / "unsigned"
    shutil.copytree(run.bundle_dir, unsigned)
    (unsigned / SIGNATURE).unlink()
    _tar(unsigned, www / "unsigned.tar.gz")
    foreign = tmp_path / "foreign"
    shutil.copytree(run.bundle_dir, foreign)
    _other_key_sign(foreign)
    _tar(foreign, www / "foreign.tar.gz")
    save_npz(www / "test.npz", TestData(run.x_test[:40], run.y_test[:40], "digits"))
    srv = _Server(www)
    state = tmp_path / "state"
    agent = Agent(run.bundle_dir, AgentConfig(device_id="dev-a", trust=release_trust(), threads=1, state_dir=state,
                                              update_bases=(f"{srv.url}/",)),
                  commands={"bench": job_mod.agent_command})
    try:
        yield agent, srv, state, {"unsigned": unsigned, "foreign": foreign}
    finally:
        srv.close()


def _bench(agent: Agent, **kw) -> dict:  # type: ignore[no-untyped-def]
    return agent.fleet.handle_command({**JOB, **kw})


def _left_behind(state: Path) -> list[str]:
    return sorted(p.name for p in state.rglob("*")) if state.exists() else []


def test_bench_runs_only_bundles_the_device_trusts(served):  # type: ignore[no-untyped-def]
    agent, srv, state, dirs = served
    for name in ("unsigned", "foreign"):  # on the allow-list, but not signed by a key this device trusts
        out = _bench(agent, bundle_url=f"{srv.url}/{name}.tar.gz")
        assert not out["ok"] and out["error"].startswith("not a bundle this device trusts"), out
    for name in ("unsigned", "foreign"):  # the same bundles as folders on the device: no path is taken
        out = _bench(agent, bundle_path=str(dirs[name]))
        assert not out["ok"] and out["error"].startswith("bench refused: bundle_path is not accepted"), out
    out = _bench(agent, bundle_url=f"{srv.url}/good.tar.gz")  # signed by the release key: it runs
    assert out["ok"], out
    out = _bench(agent, bundle_sha256=agent.bundle.manifest_sha256)  # the one it runs, by its id
    assert out["ok"], out
    out = _bench(agent, bundle_sha256="0" * 64)
    assert not out["ok"] and out["error"].startswith("bench refused: this device holds no bundle 0000000000000000")
    assert agent.bundle.version == "1"  # a bench never switches what the device runs
    assert _left_behind(state) in ([], ["bundles"])  # the fetched bundle went after its job


def test_bench_takes_urls_only_from_the_allow_list_and_its_errors_are_no_oracle(served, tmp_path):  # type: ignore[no-untyped-def]
    agent, srv, state, _ = served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    out = _bench(agent, bundle_url=f"http://127.0.0.1:{closed}/b.tar.gz")  # a port scan through the device
    assert out["error"] == "bench refused: bundle_url is not on the update allow-list", out
    out = _bench(agent, bundle_url="file:///etc/passwd")
    assert out["error"] == "bench refused: bundle_url is not on the update allow-list", out
    # test data by path: the same answer whether the file is there or not (no file-existence oracle)
    exists, missing = tmp_path / "www" / "test.npz", tmp_path / "nothing-here.npz"
    msgs = {_bench(agent, accuracy=True, data=str(p))["error"] for p in (exists, missing, "/etc/passwd")}
    assert msgs == {"bench refused: test data must be a URL on the update allow-list (the device reads no paths)"}
    out = _bench(agent, accuracy=True, data=f"http://127.0.0.1:{closed}/t.npz")
    assert out["error"] == "bench refused: data URL is not on the update allow-list", out
    # on the allow-list, but failing: one message, whatever the network said
    out = _bench(agent, accuracy=True, data=f"{srv.url}/missing.npz")
    assert out["error"] == "test data download failed", out
    out = _bench(agent, accuracy=True, data=f"{srv.url}/test.npz")  # allowed: accuracy on the device
    assert out["ok"], out
    reply_errors = json.dumps([agent.fleet.last_cmd])
    for leak in (str(tmp_path), "Errno", "Connection refused", "No such file"):
        assert leak not in reply_errors
    assert not [p for p in _left_behind(state) if p.startswith(("bench-data", "fetch"))]


def test_bench_downloads_are_bounded_in_size_and_time_and_leave_no_file(served, monkeypatch):  # type: ignore[no-untyped-def]
    agent, srv, state, _ = served
    monkeypatch.setattr(job_mod, "MAX_JOB_DATA_BYTES", 1 << 20)
    monkeypatch.setattr(job_mod, "JOB_DOWNLOAD_DEADLINE_S", 1.0)
    for path in ("big", "big-declared"):
        srv.sent = 0
        out = _bench(agent, accuracy=True, data=f"{srv.url}/{path}")
        assert out["error"] == "test data download failed", out
        assert srv.sent < 16 << 20  # the agent stopped reading near the bound, it did not take the whole body
    t0 = time.monotonic()
    out = _bench(agent, accuracy=True, data=f"{srv.url}/slow")  # a byte every 0.2 s: never past the socket timeout
    assert out["error"] == "test data download failed" and time.monotonic() - t0 < 5, out
    assert not [p for p in _left_behind(state) if p.startswith(("bench-data", "fetch"))]
    big = np.zeros((3000, 1, 8, 8), np.float32)  # a small compressed file that decompresses past the bound
    np.savez_compressed(Path(agent.config.state_dir).parent / "www" / "bomb.npz", X_raw=big, y=np.zeros(3000))
    monkeypatch.setattr(job_mod, "MAX_JOB_DATA_BYTES", 256 << 10)
    out = _bench(agent, accuracy=True, data=f"{srv.url}/bomb.npz")
    assert not out["ok"] and "past the 262144 bound" in out["error"] and str(state) not in out["error"], out


def test_fleet_jobs_name_bundles_by_id_and_data_by_url(tiny_cascade):  # type: ignore[no-untyped-def]
    from edgecore.bundle import open_bundle
    from edgecore.errors import BenchError
    from hw_bench.fleet import FleetJob

    msg = FleetJob().message(job_id="j", bundle=str(tiny_cascade.tarball))  # a bundle here: sent as its id
    assert msg["bundle_sha256"] == open_bundle(tiny_cascade.bundle_dir).manifest_sha256 and "bundle_path" not in msg
    assert FleetJob().message(job_id="j", bundle="http://gw/api/bundles/b")["bundle_url"] == "http://gw/api/bundles/b"
    with pytest.raises(BenchError, match="devices read test data only from an http"):
        FleetJob(data="/data/test.npz").message(job_id="j", bundle=None)


def test_a_bundle_in_a_configured_bench_dir_is_named_by_id_and_still_verified(served, tmp_path):  # type: ignore[no-untyped-def]
    """A shared mount given with --bench-dir: its bundles are named by manifest sha256, opened under the device's
    trust (an unsigned one there is refused), and nothing outside it is looked at."""
    import dataclasses

    from edgecore.bundle import sha256_file

    agent, srv, state, dirs = served
    share = tmp_path / "share"
    (share / "job-1").mkdir(parents=True)
    good = retag_bundle(tmp_path / "unsigned", share / "job-1" / "cand", version="9")  # re-signed copy
    good.unlink()  # (the tarball beside it is not needed: folders are looked at)
    retag_bundle(tmp_path / "unsigned", share / "job-1" / "unsigned", version="10").unlink()
    (share / "job-1" / "unsigned" / SIGNATURE).unlink()  # another bundle than the running one, unsigned
    out = _bench(agent, bundle_sha256=sha256_file(share / "job-1" / "cand" / "manifest.json"))
    assert not out["ok"] and "holds no bundle" in out["error"]  # not a bench dir of this agent yet
    agent.config = dataclasses.replace(agent.config, bench_dirs=(share,))
    out = _bench(agent, bundle_sha256=sha256_file(share / "job-1" / "cand" / "manifest.json"))
    assert out["ok"], out
    out = _bench(agent, bundle_sha256=sha256_file(share / "job-1" / "unsigned" / "manifest.json"))
    assert not out["ok"] and out["error"].startswith("bench refused: the bundle is not one this device trusts"), out


def test_the_running_bundle_is_verified_again_before_a_bench_loads_it_from_disk(tiny_cascade, tmp_path):  # type: ignore[no-untyped-def]
    copy = tmp_path / "running"
    shutil.copytree(tiny_cascade.bundle_dir, copy)
    agent = Agent(copy, AgentConfig(device_id="dev-a", trust=release_trust(), threads=1, state_dir=tmp_path / "s"),
                  commands={"bench": job_mod.agent_command})
    assert _bench(agent)["ok"]
    with open(copy / "model.onnx", "ab") as f:  # changed on disk after the agent loaded it
        f.write(b"\0")
    out = _bench(agent)
    assert not out["ok"] and out["error"].startswith("bench refused: the bundle is not one this device trusts"), out
