"""The agent's parts, each alone: local model, cloud client, telemetry recorder, outbox, commands, updates."""

from __future__ import annotations

import functools
import http.server
import json
import sqlite3
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tomllib

from device_agent.agent import Agent, AgentConfig, summarize
from device_agent.cloud import CloudClient, Ticket, _Pending
from device_agent.commands import (
    ENTRY_POINT_GROUP,
    CommandRegistry,
    entry_point_commands,
)
from device_agent.model import LocalModel, load_model
from device_agent.outbox import DropPolicy, Outbox
from device_agent.telemetry import (
    COUNT_KEYS,
    TelemetryRecorder,
    WindowCounters,
    answer_counts,
)
from device_agent.updates import fetch_bundle, prune_bundles, url_allowed
from edgecore import wire
from edgecore.bundle import file_entries, open_bundle
from edgecore.errors import AgentError, BundleTrustError
from tests.agent.tiny import items, release_trust, retag_bundle, sign_dir

ROOT = Path(__file__).resolve().parents[2]


def _bad_drift_bundle(src: Path, dst: Path) -> Path:
    """A bundle whose files all verify but whose drift reference is not JSON."""
    retag_bundle(src, dst, version="bad-drift")
    (dst / "drift_reference.json").write_text("{not json")
    m = json.loads((dst / "manifest.json").read_text())
    m["files"] = {k: e.to_dict() for k, e in file_entries(dst, ["model.onnx", "drift_reference.json"]).items()}
    (dst / "manifest.json").write_text(json.dumps(m))
    sign_dir(dst)  # signed by the trusted release key: only the content is wrong
    return dst


# --- local model -----------------------------------------------------------------------------

def test_local_model_reads_everything_before_a_swap_and_rolls_back(tiny_cascade, tmp_path):
    run = tiny_cascade
    v1 = load_model(open_bundle(run.bundle_dir), threads=1)
    assert v1.threshold is not None and v1.drift_reference and v1.measure == "max_prob"
    with pytest.raises(BundleTrustError, match="unreadable drift reference"):
        load_model(open_bundle(_bad_drift_bundle(run.bundle_dir, tmp_path / "bad")), threads=1)
    retag_bundle(run.bundle_dir, tmp_path / "v2", version="2")
    v2 = load_model(open_bundle(tmp_path / "v2"), threads=1)
    rolled: list[str] = []
    lm = LocalModel(v1, on_rollback=lambda m, e: rolled.append(m.bundle.version))
    with pytest.raises(AgentError, match="none to roll back"):
        lm.rollback(RuntimeError("x"))
    lm.swap(v2)
    assert lm.current is v2 and lm.previous is v1
    inf = lm.infer(run.x_test[:8])
    assert inf.model is v2 and inf.preds.shape == (8,) and inf.confidence.shape == (8,)
    assert np.all((inf.confidence > 0) & (inf.confidence <= 1)) and inf.seconds > 0
    # one input: the runner's own path answers as the batch path does
    for i in range(8):
        m, pred, conf, dt = lm.answer_one(run.x_test[i])
        assert m is v2 and pred == inf.preds[i] and conf == pytest.approx(inf.confidence[i], abs=1e-5) and dt > 0
    with pytest.raises(AgentError, match=r"shape \[1\]; the bundle takes samples of shape \[1, 8, 8\]"):
        lm.answer_one(np.ones(1, np.float32))  # would broadcast into every pixel: refused, and no rollback
    with pytest.raises(AgentError, match="inputs of shape"):
        lm.infer(run.x_test[:2, :, :4])
    assert lm.current is v2 and rolled == []

    class Boom:
        def run(self, x):
            raise RuntimeError("runtime crashed")

    import dataclasses

    lm.swap(dataclasses.replace(v2, runner=Boom()))
    m, pred, conf, _ = lm.answer_one(run.x_test[0])  # the broken one fails live on one input: rolled back
    assert m is v2 and pred == inf.preds[0] and rolled == ["2"] and lm.previous is None
    lm.swap(dataclasses.replace(v2, runner=Boom()))
    inf = lm.infer(run.x_test[:8])  # and on a batch
    assert inf.model is v2 and rolled == ["2", "2"] and lm.previous is None


def test_update_with_unreadable_drift_reference_keeps_the_old_model_serving(tiny_cascade, tmp_path):
    run = tiny_cascade
    agent = Agent(run.bundle_dir, AgentConfig(device_id="x", trust=release_trust(), threads=1, state_dir=tmp_path / "s"))
    old = agent.bundle.manifest_sha256
    bad = _bad_drift_bundle(run.bundle_dir, tmp_path / "bad")
    with pytest.raises(BundleTrustError, match="drift reference"):
        agent.swap_bundle(open_bundle(bad))
    assert agent.bundle.manifest_sha256 == old and agent.model.previous is None
    assert summarize(list(agent.run(items(run.x_test[:30], run.y_test[:30]))))["accuracy"] > 0.8


# --- cloud client ----------------------------------------------------------------------------

def _reply(corr: bytes, **body) -> SimpleNamespace:
    return SimpleNamespace(payload=wire.dumps(body), properties=SimpleNamespace(CorrelationData=corr))


def test_cloud_client_matches_replies_and_names_every_fallback():
    c = CloudClient(wire.Topics("d"), deadline_s=0.05)
    assert c.ask(np.zeros((1, 8, 8), np.float32)) is None  # no link: the caller falls back ("broker")

    def ticket(corr: bytes) -> Ticket:
        p = _Pending()
        c._pending[corr] = p
        return Ticket(corr, p, 0.0)

    tickets = {0: ticket(b"a"), 1: ticket(b"b"), 2: ticket(b"c"), 3: None, 4: ticket(b"e")}
    c.on_response(_reply(b"a", ok=True, prediction=7))
    c.on_response(_reply(b"b", ok=False, error="teacher failed"))
    c.on_response(SimpleNamespace(payload=b"garbage", properties=SimpleNamespace(CorrelationData=b"e")))
    c.on_response(_reply(b"zz", ok=True, prediction=1))  # unknown correlation: ignored
    got = c.collect(tickets)
    assert got[0].prediction == 7 and got[0].reason is None and got[0].rtt_s is not None
    assert [got[i].reason for i in (1, 2, 3, 4)] == ["error", "timeout", "broker", "error"]
    assert c.pending == 0  # every ticket left the table, answered or not
    late = ticket(b"late")
    c.collect({0: late})
    c.on_response(_reply(b"late", ok=True, prediction=3))  # after its deadline: nobody waits for it
    assert late.pending.reply is None
    c2 = CloudClient(wire.Topics("d"), deadline_s=0.5)  # MQTT 3.1.1: correlation echoed in the body
    t = Ticket(b"\x01\x02", _Pending(), 0.0)
    c2._pending[t.correlation] = t.pending
    c2.on_response(SimpleNamespace(payload=wire.dumps({"ok": True, "prediction": 4, "correlation": "0102"}),
                                   properties=None))
    assert c2.collect({0: t})[0].prediction == 4


# --- telemetry recorder --------------------------------------------------------------------------

def test_window_counters_survive_the_process_and_a_torn_reset(tmp_path):
    path = tmp_path / "window.bin"
    w = WindowCounters(path)
    assert w.seq == -1
    w.reset(seq=5, t_start=100.0)
    w.add({"inputs": 3, "edge": 2, "cloud": 1})
    del w  # no sync, no close: what a kill -9 leaves
    again = WindowCounters(path)
    assert again.seq == 5 and again.t_start == 100.0 and again.counts()["inputs"] == 3
    path.write_bytes(b"\0" * path.stat().st_size)  # not a window file: start over rather than misread
    assert WindowCounters(path).seq == -1
    assert answer_counts([("edge", None), ("fallback", "timeout"), ("cloud", None)]) == {
        "edge": 1, "fallback": 1, "fallback_timeout": 1, "cloud": 1, "inputs": 3}


def test_recorder_closes_windows_only_after_they_are_stored(tiny_cascade):
    ref = open_bundle(tiny_cascade.bundle_dir).drift_reference()
    rec = TelemetryRecorder(ref)
    rec.window.reset(seq=0, t_start=1.0)
    rec.count({"inputs": 4, "edge": 4})
    rec.observe(seconds=0.001, confidence=np.full(4, 0.9), raw=tiny_cascade.x_test[:4])

    def failing(msg):
        raise OSError("disk full")

    with pytest.raises(OSError):
        rec.close_window(t_end=2.0, emit=failing)
    assert rec.window.counts()["inputs"] == 4 and rec.window.seq == 0  # nothing lost
    stored: list[dict] = []
    msg = rec.close_window(t_end=2.0, emit=lambda m: stored.append(m) or 1)
    assert stored == [msg] and msg["seq"] == 0 and msg["counts"]["inputs"] == 4
    assert rec.window.seq == 1 and rec.window.counts() == dict.fromkeys(COUNT_KEYS, 0)
    assert rec.totals["inputs"] == 4  # cumulative counts go on


# --- outbox ------------------------------------------------------------------------------------

def test_outbox_counts_dropped_inputs_and_keeps_boot_and_last_seq(tmp_path):
    box = Outbox(tmp_path / "o.sqlite", max_rows=2)
    boot = box.boot
    for i in range(4):
        box.put("t", b"w", inputs=10 + i, seq=i)
    assert box.stats() == {"dropped": 2, "dropped_inputs": 21, "queued": 2} and box.last_put_seq == 3
    box.close()
    again = Outbox(tmp_path / "o.sqlite", max_rows=2, policy=DropPolicy.DROP_NEWEST)
    assert again.boot == boot and again.last_put_seq == 3
    assert not again.put("t", b"w", inputs=5, seq=4)
    assert again.stats()["dropped_inputs"] == 26 and again.last_put_seq == 4
    assert Outbox(tmp_path / "other.sqlite").boot != boot  # a new state dir: a new boot id
    fwd = Outbox(tmp_path / "f.sqlite", max_rows=2)
    for i in range(2):
        fwd.put("t", f"m{i}".encode(), inputs=1)
    first = fwd.peek()  # being forwarded: the bound drops the next oldest instead
    fwd.put("t", b"m2", inputs=1)
    assert fwd.peek() == first and fwd.stats()["dropped_inputs"] == 1
    old = sqlite3.connect(tmp_path / "r1.sqlite")  # an outbox written by round 1 (no inputs column)
    old.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
                " payload BLOB NOT NULL, created REAL NOT NULL)")
    old.execute("INSERT INTO outbox (topic, payload, created) VALUES ('t', x'00', 0)")
    old.commit()
    old.close()
    r1 = Outbox(tmp_path / "r1.sqlite")
    assert len(r1) == 1 and r1.put("t", b"x", inputs=2)


def test_a_window_the_broker_took_stays_until_a_gateway_acknowledges_it_from_the_first_window_on(tmp_path):
    """A PUBACK is not storage: even before any gateway acknowledged anything, a window the broker took stays
    (marked sent, sent again later) until the gateway's acknowledgement; only ``acked_by="broker"`` (a gateway
    that does not acknowledge) deletes it at the PUBACK, until an acknowledgement is first seen."""
    box = Outbox(tmp_path / "g.sqlite")
    box.put("t", b"w0", inputs=3, seq=0)
    row_id, _, _ = box.peek()
    box.ack(row_id)  # the broker's PUBACK
    assert len(box) == 1 and box.peek() is None and not box.acks_from_gateway
    assert box.overdue(0.0) == 1 and box.overdue(60.0) == 0
    assert box.peek(resend_after_s=0.0) is not None  # sent again after the resend time
    assert box.gateway_acked(box.boot, 0) and len(box) == 0 and box.overdue(0.0) == 0
    legacy = Outbox(tmp_path / "b.sqlite", acked_by="broker")
    legacy.put("t", b"w0", inputs=3, seq=0)
    legacy.ack(legacy.peek()[0])
    assert len(legacy) == 0  # deleted at the PUBACK ...
    legacy.put("t", b"w1", inputs=3, seq=1)
    legacy.gateway_acked(legacy.boot, 99)  # ... until a gateway acknowledges something
    legacy.ack(legacy.peek()[0])
    assert len(legacy) == 1
    with pytest.raises(AgentError, match="telemetry_acked_by must be one of gateway, broker"):
        Outbox(tmp_path / "x.sqlite", acked_by="maybe")


# --- commands ----------------------------------------------------------------------------------

def test_command_registry_has_one_function_per_command(tiny_cascade):
    calls: list[dict] = []
    reg = CommandRegistry({"ping": lambda agent, cmd: calls.append(cmd)}, discover=False)
    assert reg.names() == ["ping", "set_threshold", "update_bundle"]
    reg.get("ping")(None, {"cmd": "ping"})
    assert calls == [{"cmd": "ping"}]
    with pytest.raises(AgentError, match=r"unknown command 'reboot' \(ping, set_threshold, update_bundle\)"):
        reg.get("reboot")
    with pytest.raises(AgentError, match="unknown command None"):
        reg.get(None)
    agent = Agent(tiny_cascade.bundle_dir, AgentConfig(device_id="x", trust=release_trust()), commands={"ping": reg.get("ping")})
    assert agent.fleet.handle_command({"cmd": "ping", "n": 1}) == {"cmd": "ping", "ok": True}
    out = agent.fleet.handle_command({"cmd": "update_bundle", "url": "http://evil.example/b.tar.gz"})
    assert not out["ok"] and "--update-base" in out["error"]  # no bases configured: updates by URL refused


def test_bench_is_registered_as_an_entry_point_not_imported():
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert eps == {"bench": "hw_bench.job:agent_command"}
    from hw_bench.job import agent_command

    found = entry_point_commands()
    if "bench" in found:  # present once the editable install's metadata was refreshed (pip install -e .)
        assert found["bench"] is agent_command


# --- updates -------------------------------------------------------------------------------------

def test_update_urls_must_stay_under_the_configured_bases():
    bases = ["http://gw:8080/api/bundles"]
    assert url_allowed("http://gw:8080/api/bundles/v2", bases)
    assert url_allowed("HTTP://GW:8080/api/bundles/v2?x=1", bases)
    for bad in ("http://gw:8080/metrics", "http://gw:8081/api/bundles/v2", "https://gw:8080/api/bundles/v2",
                "http://gw:8080/api/bundlesX", "http://gw:8080/api/bundles/../../metrics",
                "http://gw:8080/api/bundles/%2e%2e/metrics", "http://user@gw:8080/api/bundles/v2",
                "file:///etc/passwd", "http://other:8080/api/bundles/v2"):
        assert not url_allowed(bad, bases), bad
    assert url_allowed("http://gw/x/b.tar.gz", ["http://gw:80/"])
    assert not url_allowed("http://gw/x", [])


class _Server:
    """A real HTTP server over a folder; ``/go/<x>`` redirects to ``<redirect><x>``."""

    def __init__(self, root: Path, redirect: str = "") -> None:
        class H(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                if self.path.startswith("/go/"):
                    self.send_response(302)
                    self.send_header("Location", redirect + self.path[4:])
                    self.end_headers()
                    return
                super().do_GET()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(H, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_errors_say_what_failed_without_network_details(tiny_cascade, tmp_path):
    import socket

    served = tmp_path / "www"
    served.mkdir()
    (served / "junk.tar.gz").write_bytes(b"not a gzip at all")
    (served / "good.tar.gz").write_bytes(tiny_cascade.tarball.read_bytes())
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    srv = _Server(served, redirect=f"http://127.0.0.1:{closed}/")
    state = tmp_path / "state"
    try:
        ok = fetch_bundle(url=f"{srv.url}/good.tar.gz", sha256=None, state_dir=state, allowed=[srv.url], trust=release_trust())
        assert ok.root.parent == state / "bundles"
        msgs = {}
        for name, url, allowed in [
            ("refused", f"http://127.0.0.1:{closed}/b.tar.gz", [f"http://127.0.0.1:{closed}"]),
            ("404", f"{srv.url}/missing.tar.gz", [srv.url]),
            ("redirect out", f"{srv.url}/go/b.tar.gz", [srv.url]),
        ]:
            with pytest.raises(BundleTrustError) as e:
                fetch_bundle(url=url, sha256=None, state_dir=state, allowed=allowed, trust=release_trust())
            msgs[name] = str(e.value)
        assert set(msgs.values()) == {"bundle download failed"}, msgs  # no oracle between them
        with pytest.raises(BundleTrustError, match="^not a bundle this device trusts") as e:
            fetch_bundle(url=f"{srv.url}/junk.tar.gz", sha256=None, state_dir=state, allowed=[srv.url], trust=release_trust())
        assert str(tmp_path) not in str(e.value) and "gzip" not in str(e.value).lower()
    finally:
        srv.close()
    assert sorted(p.name for p in state.iterdir()) == ["bundles"]  # no temp dirs left behind


def test_agent_keeps_current_and_previous_bundle_only(tiny_cascade, tmp_path):
    run = tiny_cascade
    served = tmp_path / "www"
    served.mkdir()
    for v in ("2", "3", "4"):
        tar = retag_bundle(run.bundle_dir, tmp_path / f"v{v}", version=v)
        (served / tar.name).write_bytes(tar.read_bytes())
    srv = _Server(served)
    state = tmp_path / "state"
    agent = Agent(run.bundle_dir, AgentConfig(device_id="x", trust=release_trust(), threads=1, state_dir=state,
                                              update_bases=(f"{srv.url}/",)))
    (state / "bundles").mkdir(parents=True)
    (state / "bundles" / "stale").mkdir()  # left by an older agent
    try:
        for v in ("2", "3", "4"):
            assert agent.fleet.handle_command({"cmd": "update_bundle", "url": f"{srv.url}/v{v}.tar.gz"})["ok"]
            assert agent.bundle.version == v
    finally:
        srv.close()
    kept = sorted(p.resolve() for p in (state / "bundles").iterdir())
    assert kept == sorted([agent.bundle.root.resolve(), agent.model.previous.bundle.root.resolve()])
    assert agent.model.previous.bundle.version == "3"
    assert prune_bundles(state, [agent.bundle.root]) and len(list((state / "bundles").iterdir())) == 1


def test_progress_bars_only_on_a_terminal_and_ort_never_spins(tiny_cascade, tmp_path):
    import io

    from edgecore.clikit import on_terminal, progress_bar
    from targets._ort import OrtRunner

    log = io.StringIO()  # a log file, not a TTY: no bar frames in it
    assert not on_terminal(log)
    for _ in progress_bar(range(50), file=log, desc="x"):
        pass
    assert log.getvalue() == ""
    so = OrtRunner(tiny_cascade.bundle_dir / "model.onnx").session.get_session_options()
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
