"""``hw-bench fleet-sim``: thousands of simulated devices against a broker + gateway; what is offered, stored, lost.

Devices are simulated over a few MQTT connections (the broker's ``admin`` user may publish under every device's
id): each device publishes a retained ``online`` status, then one telemetry window (about 1.1 KB, the shape an
agent sends) every ``period_s``, phases spread evenly, at QoS 1, for ``seconds``. A local Mosquitto (queue of
``broker_queue`` messages per client) and one gateway process (``cloud-gateway serve``, SQLite or a PostgreSQL
URL) are started here. While it runs the API is polled (the dashboard's one request, a device page, the summary,
``/metrics``) and the gateway's CPU and memory are sampled from ``/proc``.

Reported: windows offered (every PUBACK came), stored (rows in the store), acknowledged by the gateway, lost
(offered - stored: an agent would resend those it saw no acknowledgement for), the store rate, statuses stored,
the gateway's CPU (% of one core) and peak RSS, API latencies, the machine's CPU model and load average. The
simulated devices do not resend: what is lost here is what agents would have had to send again.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from edgecore import wire
from edgecore.errors import BenchError


def window(device: str, seq: int, now: float) -> bytes:
    """A telemetry window as an agent sends it (docs/wire.md), about 1.1 KB."""
    r = random.Random(hash((device, seq)))
    lat = {k: {"count": 900, "mean": 0.0001, "p50": r.uniform(5e-5, 2e-4), "p95": r.uniform(2e-4, 9e-4),
               "p99": r.uniform(9e-4, 2e-3)} for k in ("edge",)}
    lat["cloud_rtt"] = {"count": 90, "mean": 0.002, "p50": 0.002, "p95": r.uniform(0.003, 0.02), "p99": 0.03}
    off = r.uniform(0.02, 0.2)
    msg = {"schema": 1, "device_id": device, "boot": "sim", "seq": seq, "t_start": now - 10.0, "t_end": now,
           "counts": {"inputs": 900, "edge": 810, "cloud": 85, "fallback": 5, "fallback_timeout": 3,
                      "fallback_broker": 1, "fallback_error": 1, "rollbacks": 0},
           "offload_rate": off, "fallback_rate": r.uniform(0.0, 0.01), "latency": lat,
           "drift": {"n": 900, "confidence": {"psi": r.uniform(0, 0.3), "ks_d": 0.05, "ks_p": 0.4},
                     "mean": {"psi": 0.01, "ks_d": 0.03, "ks_p": 0.7}, "std": {"psi": 0.02, "ks_d": 0.04, "ks_p": 0.6},
                     "flag": r.random() < 0.02},
           "threshold": 0.62, "bundle_sha256": "5f1c0e2a9b7d" * 5 + "abcd", "model": {"name": "sim", "version": "1"},
           "outbox": {"dropped": 0, "queued": 0},
           "confidence_hist": {"edges": [round(i / 20, 2) for i in range(21)],
                               "counts": [r.randrange(0, 90) for _ in range(20)]}}
    return wire.dumps(msg)


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except (OSError, subprocess.SubprocessError):
        return "?"


def _proc(pid: int) -> tuple[float, int]:
    """(user + system CPU seconds, RSS bytes) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(parts[11]) + int(parts[12])) / ticks
    with open(f"/proc/{pid}/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def _broker(stack: ExitStack, root: Path, queue: int) -> tuple[str, dict[str, Any]]:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None)
    if exe is None:
        raise BenchError("fleet-sim needs mosquitto (apt-get install mosquitto)")
    r = subprocess.run([sys.executable, "-m", "cloud_gateway.cli", "fleet-credentials", "sim-0", "--out", str(root)],
                       capture_output=True, text=True)
    if r.returncode:
        raise BenchError(f"fleet-credentials failed: {r.stderr.strip()}")
    creds = json.loads((root / "credentials.json").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import pwd

    (root / "mosquitto.conf").write_text(
        f"per_listener_settings false\nuser {pwd.getpwuid(os.getuid()).pw_name}\nlistener {port} 127.0.0.1\n"
        f"allow_anonymous false\npassword_file {root / 'passwd'}\nacl_file {root / 'acl'}\n"
        f"max_queued_messages {queue}\nmax_inflight_messages 100\nset_tcp_nodelay true\n")
    proc = subprocess.Popen([exe, "-c", str(root / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    stack.callback(_stop, proc)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        raise BenchError("the local mosquitto did not start")
    return f"mqtt://127.0.0.1:{port}", creds


def _client(url: str, user: str, pw: str, cid: str) -> Any:
    import paho.mqtt.client as mqtt

    host, port = url.removeprefix("mqtt://").split(":")
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    c.username_pw_set(user, pw)
    c.max_inflight_messages_set(200)
    c.max_queued_messages_set(0)
    c.connect(host, int(port), keepalive=30)
    c.loop_start()
    return c


def _get(url: str) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as r:
        body = r.read()
    return time.perf_counter() - t0, body


def run_fleet_sim(*, teacher: Path, devices: int = 1000, period_s: float = 10.0, seconds: float = 60.0,
                  connections: int = 8, db: str | None = None, broker_queue: int = 100_000,
                  drain_s: float = 30.0, gateway_args: tuple[str, ...] = (), workdir: Path | None = None
                  ) -> dict[str, Any]:
    """Run the simulation (see the module's doc); returns the report."""
    if devices < 1 or period_s <= 0 or seconds <= 0 or connections < 1:
        raise BenchError("--devices and --connections must be >= 1, --period and --seconds > 0")
    with ExitStack() as stack:
        tmp = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hw-bench-fleet-sim-")))
        url, creds = _broker(stack, tmp / "broker", broker_queue)
        admin = creds["admin"]
        gw_user = creds["gateway"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            http = s.getsockname()[1]
        store = db or str(tmp / "gateway.sqlite")
        err = open(tmp / "gateway.log", "w")
        stack.callback(err.close)
        gw = subprocess.Popen([sys.executable, "-m", "cloud_gateway.cli", "serve", "--broker", url, "--username",
                               gw_user["username"], f"--password={gw_user['password']}", "--teacher", str(teacher),
                               "--db", store, "--http-port", str(http), "--replica-id", "sim-gw", *gateway_args],
                              stdout=subprocess.PIPE, stderr=err, text=True)
        stack.callback(_stop, gw)
        line = gw.stdout.readline() if gw.stdout else ""
        if "serving" not in line:
            raise BenchError(f"the gateway did not start: {line.strip() or 'no output'} (log: {tmp / 'gateway.log'})")
        base = f"http://127.0.0.1:{http}"
        ids = [f"sim-{i:05d}" for i in range(devices)]
        groups = [ids[k::connections] for k in range(connections)]
        acked: set[tuple[str, int]] = set()
        ack_lock = threading.Lock()

        def on_ack(c: Any, u: Any, msg: Any) -> None:
            try:
                body = json.loads(msg.payload)
                with ack_lock:
                    acked.add((msg.topic.split("/")[1], int(body["seq"])))
            except (ValueError, KeyError, TypeError):
                pass

        ack_client = _client(url, admin["username"], admin["password"], "sim-acks")
        ack_client.on_message = on_ack
        ack_client.subscribe(f"{wire.DEFAULT_PREFIX}/+/telemetry/ack", qos=1)
        stack.callback(ack_client.loop_stop)
        pubs = [_client(url, admin["username"], admin["password"], f"sim-pub-{k}") for k in range(connections)]
        for c in pubs:
            stack.callback(c.loop_stop)
        time.sleep(1.0)
        for c, g in zip(pubs, groups):  # every device says it is online (retained, as agents do)
            infos = [c.publish(f"{wire.DEFAULT_PREFIX}/{d}/status",
                               wire.dumps({"schema": 1, "device_id": d, "state": "online", "model": "sim",
                                           "version": "1" if i % 4 else "2", "time": time.time()}),
                               qos=1, retain=True) for i, d in enumerate(g)]
            for info in infos:
                info.wait_for_publish(60)
        offered = [0] * connections
        stop = threading.Event()
        cpu0, _ = _proc(gw.pid)
        rss_peak = [0]
        api: dict[str, list[float]] = {"dashboard": [], "device": [], "summary": [], "metrics": []}

        def publisher(k: int) -> None:
            c, g = pubs[k], groups[k]
            t0 = time.monotonic()
            seq = dict.fromkeys(g, 0)
            pending = []
            n = len(g)
            step = period_s / max(1, n)
            i = 0
            while not stop.is_set():
                due = t0 + (i // n) * period_s + (i % n) * step  # device i % n, round i // n
                if due > t0 + seconds:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(min(wait, 0.05))
                    continue
                d = g[i % n]
                pending.append(c.publish(f"{wire.DEFAULT_PREFIX}/{d}/telemetry", window(d, seq[d], time.time()), qos=1))
                seq[d] += 1
                i += 1
                if len(pending) > 2000:
                    pending = [p for p in pending if not p.is_published()]
            for p in pending:
                p.wait_for_publish(120)
            offered[k] = i

        def sampler() -> None:
            while not stop.is_set():
                try:
                    rss_peak[0] = max(rss_peak[0], _proc(gw.pid)[1])
                    for name, path in (("dashboard", "/api/fleet/dashboard?limit=50&sort=-offload_rate"),
                                       ("device", f"/api/devices/{ids[0]}?history=120"),
                                       ("summary", "/api/fleet/summary"), ("metrics", "/metrics")):
                        api[name].append(_get(base + path)[0])
                except OSError:
                    pass
                stop.wait(2.0)

        t_start = time.monotonic()
        threads = [threading.Thread(target=publisher, args=(k,), daemon=True) for k in range(connections)]
        s_thread = threading.Thread(target=sampler, daemon=True)
        for t in threads:
            t.start()
        s_thread.start()
        for t in threads:
            t.join(seconds + 180)
        t_sent = time.monotonic() - t_start
        total = sum(offered)
        # let the gateway finish: until every offered window is acknowledged or nothing moves for a while
        end = time.monotonic() + drain_s
        last, still = -1, time.monotonic()
        while time.monotonic() < end:
            with ack_lock:
                n = len(acked)
            if n >= total:
                break
            if n != last:
                last, still = n, time.monotonic()
            elif time.monotonic() - still > 5.0:
                break
            time.sleep(0.25)
        t_all = time.monotonic() - t_start
        stop.set()
        s_thread.join(10)
        cpu1, rss = _proc(gw.pid)
        rss_peak[0] = max(rss_peak[0], rss)
        summary = json.loads(_get(base + "/api/fleet/summary")[1])
        metrics = _get(base + "/metrics")[1].decode()
        stored = _count(store)
        with ack_lock:
            n_acked = len(acked)

        def metric(name: str) -> float:
            return sum(float(ln.rsplit(" ", 1)[1]) for ln in metrics.splitlines()
                       if ln.startswith(name) and not ln.startswith("#"))

        report = {
            "devices": devices, "period_s": period_s, "seconds": seconds, "connections": connections,
            "db": "postgresql" if store.startswith("postgres") else "sqlite", "broker_queue": broker_queue,
            "offered": total, "offered_per_s": total / t_sent if t_sent else None,
            "stored": stored, "acknowledged": n_acked, "lost": total - stored,
            "lost_share": (total - stored) / total if total else None,
            "store_rate_per_s": stored / t_all if t_all else None, "seconds_until_stored": t_all,
            "statuses_stored": summary.get("online"),
            "gateway_cpu_pct": 100.0 * (cpu1 - cpu0) / t_all if t_all else None,
            "gateway_rss_peak_mb": rss_peak[0] / 2**20,
            "ingest_backpressure": metric("gateway_ingest_backpressure_total"),
            "ingest_refused": metric("gateway_ingest_refused_total"),
            "ingest_batches": metric("gateway_ingest_batch_size_count"),
            "api_ms": {k: {"n": len(v), "p50": _ms(_pct(v, 50)), "p95": _ms(_pct(v, 95)), "max": _ms(max(v, default=None))}
                       for k, v in api.items()},
            "cpu_model": _cpu_model(), "load_average_after": list(os.getloadavg()), "cpus": os.cpu_count(),
        }
        return report


def _stop(p: subprocess.Popen[Any]) -> None:
    p.terminate()
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()


def _ms(v: float | None) -> float | None:
    return None if v is None else round(1000 * v, 1)


def _count(store: str) -> int:
    """Telemetry rows in the gateway's store (read directly: hw_bench does not import cloud_gateway)."""
    if "://" not in store:
        with sqlite3.connect(store) as c:
            return int(c.execute("SELECT count(*) FROM telemetry").fetchone()[0])
    import psycopg

    url = store.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as c:
        row = c.execute("SELECT count(*) FROM telemetry").fetchone()
        return int(row[0]) if row else 0


def register(sub: Any) -> None:
    """``hw-bench fleet-sim``: registered by hw_bench/cli.py."""
    from edgecore.clikit import DefaultsHelpFormatter, add_common, add_json_flag, param_default

    def d(name: str) -> Any:
        return param_default(run_fleet_sim, name)

    p = sub.add_parser("fleet-sim", help="simulated devices publish telemetry and statuses to a local broker + "
                                         "gateway: offered / stored / lost, store rate, gateway CPU and RSS, API latency",
                       formatter_class=DefaultsHelpFormatter)
    add_common(p)
    p.add_argument("--teacher", type=Path, required=True, help="the gateway's teacher (run dir or .onnx)")
    p.add_argument("--devices", type=int, default=d("devices"))
    p.add_argument("--period", type=float, default=d("period_s"), help="seconds between a device's windows")
    p.add_argument("--seconds", type=float, default=d("seconds"), help="how long devices publish")
    p.add_argument("--connections", type=int, default=d("connections"), help="MQTT connections the devices share")
    p.add_argument("--db", default=None, help="the gateway's store (default: a SQLite file here; or postgresql://...)")
    p.add_argument("--broker-queue", type=int, default=d("broker_queue"), help="Mosquitto's max_queued_messages")
    p.add_argument("--drain", type=float, default=d("drain_s"), help="seconds to wait for the last windows")
    p.add_argument("--gateway-arg", action="append", default=[], help="passed to cloud-gateway serve (repeatable)")
    add_json_flag(p)
    p.set_defaults(func=_cmd)


def _cmd(args: Any) -> int:
    from edgecore.clikit import emit_json

    out = run_fleet_sim(teacher=args.teacher, devices=args.devices, period_s=args.period, seconds=args.seconds,
                        connections=args.connections, db=args.db, broker_queue=args.broker_queue, drain_s=args.drain,
                        gateway_args=tuple(args.gateway_arg))
    if args.json:
        emit_json(out)
    else:
        print(json.dumps(out, indent=2))
    return 0
