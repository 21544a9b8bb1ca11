"""``hw-bench gateway``: a load generator for the edge-cloud split, and the MQTT floor to compare with.

Clients are MQTT 5 devices that publish tensors on ``<prefix>/<id>/infer/req``
with a response topic and correlation data, exactly as agents do. First a
closed loop (each client keeps ``inflight`` requests outstanding) finds the
maximum rate; then open loops at 50/80/100% of it measure the round trip.
With ``--floor`` the same is measured against a minimal paho + onnxruntime
responder (this module's ``__main__``) in the same session, and the ratio is
reported. Point it at your own broker and gateway (``--broker``,
``--credentials``), or let it start a local Mosquitto and gateway
(``--teacher``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgecore import wire
from edgecore.errors import BenchError, BrokerError
from edgecore.mqtt import MqttLink

from .envinfo import StealMeter, cpu_record, load_average, steal_note

LEVELS = (0.5, 0.8, 1.0)


class _Client:
    """One simulated device: publishes requests, matches replies by correlation, records round trips."""

    def __init__(self, url: str, device: str, password: str, payload: bytes, prefix: str) -> None:
        topics = wire.Topics(device, prefix)
        self.req, self.resp = topics.req, topics.resp
        self.payload, self.sent, self.rtts, self.errors = payload, {}, [], 0
        self.lock, self.cv, self.n = threading.Lock(), threading.Condition(), 0
        try:
            self.link = MqttLink(url=url, client_id=f"load-{device}-{os.getpid()}", username=device,
                                 password=password, keepalive=30, max_inflight=1000)
            self.link.subscribe(self.resp, self._on_reply)
            self.link.start(wait=10)  # returns once the reply subscription is acknowledged
        except BrokerError as e:
            raise BenchError(f"load client {device} could not subscribe on {url} (credentials? ACL?): {e}") from e

    def send(self) -> None:
        with self.lock:
            self.n += 1
            corr = self.n.to_bytes(8, "little")
            self.sent[corr] = time.perf_counter()
        self.link.publish(self.req, self.payload, qos=1, response_topic=self.resp, correlation=corr)

    def _on_reply(self, msg: Any) -> None:
        corr = bytes(getattr(msg.properties, "CorrelationData", b"") or b"")
        with self.lock:
            t0 = self.sent.pop(corr, None)
        if t0 is None:
            return
        self.rtts.append(time.perf_counter() - t0)
        if b'"ok":true' not in msg.payload:
            self.errors += 1
        with self.cv:
            self.cv.notify_all()

    def outstanding(self) -> int:
        with self.lock:
            return len(self.sent)

    def close(self) -> None:
        self.link.stop()


def _closed_loop(clients: list[_Client], inflight: int, seconds: float) -> float:
    """Requests/s with ``inflight`` outstanding per client."""
    stop = time.perf_counter() + seconds
    start_counts = [len(c.rtts) for c in clients]

    def drive(c: _Client) -> None:
        while time.perf_counter() < stop:
            while c.outstanding() < inflight:
                c.send()
            with c.cv:
                c.cv.wait(0.05)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=drive, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = sum(len(c.rtts) - s for c, s in zip(clients, start_counts))
    return done / (time.perf_counter() - t0)


def _open_loop(clients: list[_Client], rate: float, seconds: float) -> dict[str, Any]:
    """Send at ``rate`` requests/s in total (spread over the clients); round-trip percentiles."""
    for c in clients:
        c.rtts.clear()
    first = [c.n for c in clients]  # request numbers above these were sent in this phase
    interval = len(clients) / rate
    stop = time.perf_counter() + seconds

    def pace(c: _Client, offset: float) -> None:
        nxt = time.perf_counter() + offset
        while nxt < stop:
            time.sleep(max(0.0, nxt - time.perf_counter()))
            c.send()
            nxt += interval

    threads = [threading.Thread(target=pace, args=(c, i * interval / len(clients)), daemon=True)
               for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.5)  # late replies
    rtts = np.array([r for c in clients for r in c.rtts]) * 1000
    sent = lost = 0
    for c, n0 in zip(clients, first, strict=True):  # counted, not rate x seconds: a pacer may stop one short
        with c.lock:
            sent += c.n - n0
            lost += sum(int.from_bytes(corr, "little") > n0 for corr in c.sent)  # still unanswered
    if not len(rtts):
        raise BenchError("no replies at all: is a gateway serving this broker?")
    return {"rate": round(rate, 1), "answered": int(len(rtts)), "sent": sent,
            "lost": lost, "errors": sum(c.errors for c in clients),
            **{f"p{q}_ms": round(float(np.percentile(rtts, q)), 3) for q in (50, 95, 99)}}


def measure(url: str, devices: dict[str, str], *, payload: bytes, clients: int, inflight: int, seconds: float,
            prefix: str = wire.DEFAULT_PREFIX, rates: tuple[float, ...] = ()) -> dict[str, Any]:
    """The closed-loop maximum, then open-loop levels at `LEVELS` of it and at the fixed ``rates`` (requests/s
    in total, the same for every responder: latency at equal offered load)."""
    ids = list(devices)[:clients]
    if len(ids) < clients:
        raise BenchError(f"{clients} clients need {clients} device credentials, the file has {len(devices)}")
    cs = [_Client(url, d, devices[d], payload, prefix) for d in ids]
    try:
        _closed_loop(cs, inflight, min(1.0, seconds / 2))  # warm-up
        max_rate = _closed_loop(cs, inflight, seconds)
        levels = [{"load": lv, **_open_loop(cs, max_rate * lv, seconds)} for lv in LEVELS]
        levels += [{"load": None, **_open_loop(cs, float(r), seconds)} for r in rates]
    finally:
        for c in cs:
            c.close()
    return {"max_offloads_per_s": round(max_rate, 1), "levels": levels}


# --- local broker, gateway and floor responder ------------------------------------------------------
def _spawn(args: list[str], ready: str) -> subprocess.Popen[str]:
    """Start ``python ARGS`` and wait for its ``ready`` line; on failure say what its stderr said."""
    err = tempfile.TemporaryFile(mode="w+")  # not a pipe: nobody reads it while the process runs
    p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=err, text=True)
    line = p.stdout.readline() if p.stdout else ""
    if ready not in line:
        p.kill()
        p.wait(10)
        err.seek(0)
        tail = [x for x in err.read().splitlines() if x.strip()][-5:]
        err.close()
        raise BenchError(f"{args[1]} did not start: {line.strip() or 'no output'}"
                         + ("; its stderr ended with:\n  " + "\n  ".join(tail) if tail else ""))
    err.close()  # started: the child keeps writing to its own descriptor of the (unlinked) file
    return p


def _stop(p: subprocess.Popen[str]) -> None:
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()


def _serve_gateway(url: str, user: str, pw: str, teacher: Path, tmp: Path, replicas: int = 1,
                   prefix: str = wire.DEFAULT_PREFIX) -> Iterator[None]:
    """``replicas`` gateway processes (default settings) sharing the request subscription; no HTTP."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(replicas):
            procs.append(_spawn(["-m", "cloud_gateway.cli", "serve", "--broker", url, "--username", user,
                                 f"--password={pw}", "--teacher", str(teacher), "--db", str(tmp / f"gw-{i}.sqlite"),
                                 "--http-port", "-1", "--replica-id", f"bench-gw-{i}", "--prefix", prefix],
                                "serving"))
        yield
    finally:
        for p in procs:
            _stop(p)


def _serve_floor(url: str, user: str, pw: str, teacher: Path, tmp: Path, replicas: int = 1,
                 prefix: str = wire.DEFAULT_PREFIX) -> Iterator[None]:
    p = _spawn(["-m", "hw_bench.gateway_load", url, user, pw, str(teacher), prefix], "floor ready")
    try:
        yield
    finally:
        _stop(p)


#: the goals of issue 11: the gateway within 5% of the floor, and a fast answer at half load
GOAL_VS_FLOOR = 0.95
GOAL_P50_AT_HALF_MS = 2.0


def _median_run(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-metric medians over rounds of one responder's measurements (the rounds kept beside)."""
    med = lambda xs: round(float(np.median(xs)), 3)  # noqa: E731
    levels = []
    for i, lv in enumerate(rounds[0]["levels"]):
        per = [r["levels"][i] for r in rounds]
        levels.append({"load": lv["load"], **{k: med([p[k] for p in per]) for k in
                                              ("rate", "answered", "p50_ms", "p95_ms", "p99_ms")},
                       # totals over the rounds (the others: medians)
                       **{k: int(sum(p[k] for p in per)) for k in ("sent", "lost", "errors")}})
    return {"max_offloads_per_s": med([r["max_offloads_per_s"] for r in rounds]), "levels": levels,
            "rounds": [r["max_offloads_per_s"] for r in rounds]}


def _goal(out: dict[str, Any]) -> dict[str, Any]:
    half = next(lv for lv in out["gateway"]["levels"] if lv["load"] == 0.5)
    g: dict[str, Any] = {"gateway_p50_at_half_load_ms": half["p50_ms"], "p50_at_half_load_max_ms": GOAL_P50_AT_HALF_MS}
    met = half["p50_ms"] <= GOAL_P50_AT_HALF_MS
    if "gateway_vs_floor" in out:
        g.update(gateway_vs_floor=out["gateway_vs_floor"], gateway_vs_floor_min=GOAL_VS_FLOOR)
        met = met and out["gateway_vs_floor"] >= GOAL_VS_FLOOR
    g["met"] = bool(met)
    return g


def run_gateway_bench(*, broker: str | None, devices: dict[str, str] | None, teacher: Path | None,
                      clients: int = 4, inflight: int = 4, seconds: float = 5.0, floor: bool = False,
                      gateway_user: tuple[str, str] | None = None, workdir: Path, rounds: int = 3,
                      replicas: int = 1, rates: tuple[float, ...] = (), prefix: str = wire.DEFAULT_PREFIX
                      ) -> dict[str, Any]:
    """Measure the gateway (and with ``floor`` the minimal responder) on one broker, in interleaved rounds.

    ``rates``: fixed offered loads (requests/s) measured for each responder besides the fractions of its own
    maximum; with ``floor``, ``at_equal_load`` sets their p50s side by side.
    """
    if floor and teacher is None:
        raise BenchError("--floor needs --teacher (the responder runs the same model)")
    if broker is None and teacher is None:
        raise BenchError("give --broker and --credentials (a running gateway), or --teacher (start them here)")
    with ExitStack() as stack:
        if broker is None:
            broker, devices, gateway_user = _local_broker(stack, workdir, clients, prefix)
        if devices is None:
            raise BenchError("--broker needs --credentials (the devices' passwords)")
        if teacher is not None and gateway_user is None:
            raise BenchError("starting a gateway on your broker needs its credentials in --credentials")
        shape = _teacher_shape(teacher) if teacher else (1, 1, 8, 8)
        payload = wire.encode_tensor(np.random.default_rng(0).random(shape, dtype=np.float32))
        steal = StealMeter()
        out: dict[str, Any] = {"cpu": cpu_record(), "load_average_before": load_average(), "clients": clients,
                               "inflight": inflight, "seconds": seconds, "rounds": rounds, "replicas": replicas}
        names = ["gateway"] + (["floor"] if floor else [])
        per: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # order rotated each round
                per[name].append(_measure_one(name, broker, devices, payload, teacher, gateway_user, workdir,
                                              clients=clients, inflight=inflight, seconds=seconds, replicas=replicas,
                                              rates=rates, prefix=prefix))
        for name in names:
            out[name] = _median_run(per[name])
        if floor:
            ratios = [g["max_offloads_per_s"] / max(f["max_offloads_per_s"], 1e-9)
                      for g, f in zip(per["gateway"], per["floor"])]
            out["gateway_vs_floor"] = round(float(np.median(ratios)), 3)
            out["gateway_vs_floor_rounds"] = [round(x, 3) for x in ratios]
            fixed = [(g, f) for g, f in zip(out["gateway"]["levels"], out["floor"]["levels"], strict=True)
                     if g["load"] is None]
            if fixed:
                out["at_equal_load"] = [{"rate": g["rate"], "gateway_p50_ms": g["p50_ms"], "floor_p50_ms": f["p50_ms"],
                                         "gateway_p99_ms": g["p99_ms"], "floor_p99_ms": f["p99_ms"]} for g, f in fixed]
        out["goal"] = _goal(out)
        out["load_average_after"] = load_average()
        out["steal_pct"] = steal.share()
    return out


def _measure_one(name: str, broker: str, devices: dict[str, str], payload: bytes, teacher: Path | None,
                 gateway_user: tuple[str, str] | None, workdir: Path, *, clients: int, inflight: int,
                 seconds: float, replicas: int, rates: tuple[float, ...] = (),
                 prefix: str = wire.DEFAULT_PREFIX) -> dict[str, Any]:
    from contextlib import contextmanager

    serve = _serve_gateway if name == "gateway" else _serve_floor
    ctx = contextmanager(serve)(broker, *gateway_user, teacher, workdir, replicas, prefix) \
        if teacher is not None and gateway_user is not None else ExitStack()
    with ctx:
        return measure(broker, devices, payload=payload, clients=clients, inflight=inflight, seconds=seconds,
                       rates=rates, prefix=prefix)


def _teacher_shape(teacher: Path) -> tuple[int, ...]:
    import onnxruntime as ort

    path = teacher / "teacher.onnx" if teacher.is_dir() else teacher
    try:
        shape = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    except Exception as e:  # onnxruntime raises its own types
        raise BenchError(f"--teacher {teacher}: not an ONNX teacher ({e})") from e
    return (1, *(int(d) for d in shape[1:]))


def _local_broker(stack: ExitStack, workdir: Path, clients: int, prefix: str = wire.DEFAULT_PREFIX
                  ) -> tuple[str, dict[str, str], tuple[str, str]]:
    """A Mosquitto with a fresh fleet's passwords and ACL, through the `cloud-gateway fleet-credentials` CLI
    (hw_bench does not import cloud_gateway: they are peers in the layers)."""
    import json
    import shutil
    import socket

    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None)
    if exe is None:
        raise BenchError("a local run needs mosquitto (apt-get install mosquitto), or give --broker")
    root = workdir / "broker"
    r = subprocess.run([sys.executable, "-m", "cloud_gateway.cli", "fleet-credentials",
                        *[f"load-{i}" for i in range(clients)], "--out", str(root), "--prefix", prefix], capture_output=True, text=True)
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
        "max_queued_messages 10000\nset_tcp_nodelay true\n")
    proc = subprocess.Popen([exe, "-c", str(root / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    stack.callback(lambda: (proc.terminate(), proc.wait(10)))
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        raise BenchError("the local mosquitto did not start")
    gw = creds["gateway"]
    return f"mqtt://127.0.0.1:{port}", dict(creds["devices"]), (gw["username"], gw["password"])


def _floor_main(url: str, user: str, pw: str, teacher: str, prefix: str = wire.DEFAULT_PREFIX) -> None:
    """The minimal responder: the MQTT link + onnxruntime, one request at a time, nothing else."""
    import onnxruntime as ort

    path = Path(teacher)
    path = path / "teacher.onnx" if path.is_dir() else path
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def on_message(m: Any) -> None:
        logits = sess.run(None, {name: wire.decode_tensor(m.payload)})[0][0]
        e = np.exp(logits - logits.max())
        p = e / e.sum()
        link.publish(m.properties.ResponseTopic, wire.dumps({"ok": True, "prediction": int(p.argmax()),
                                                             "probabilities": [round(float(v), 6) for v in p]}),
                     qos=1, correlation=m.properties.CorrelationData)

    link = MqttLink(url=url, client_id="floor", username=user, password=pw, keepalive=30)
    link.subscribe(wire.Topics.shared_requests(prefix), on_message)
    link.start(wait=10)  # returns once the shared subscription is acknowledged
    print("floor ready", flush=True)
    try:
        threading.Event().wait()
    finally:
        link.stop()


if __name__ == "__main__":
    _floor_main(*sys.argv[1:6])


# --- CLI ------------------------------------------------------------------------------------------
def register(sub: Any) -> None:
    """``hw-bench gateway``: registered by hw_bench/cli.py."""
    from edgecore.clikit import DefaultsHelpFormatter, add_broker_args, add_common, add_json_flag, param_default

    def d(name: str) -> Any:  # run_gateway_bench's defaults: one source
        return param_default(run_gateway_bench, name)

    p = sub.add_parser("gateway", help="load-test a gateway (offloads/s, round trip at 50/80/100%% load)",
                       formatter_class=DefaultsHelpFormatter)
    add_common(p)
    add_broker_args(p, required=False, login=False, version_help=None,
                    broker_help="mqtt(s)://host:port of a running broker + gateway (else one is started)")
    p.add_argument("--credentials", type=Path, help="fleet credentials.json (device passwords; gateway's too "
                                                   "to start one on your broker with --teacher)")
    p.add_argument("--teacher", type=Path, help="teacher run dir or .onnx: start a gateway (and broker) here")
    p.add_argument("--clients", type=int, default=d("clients"), help="simulated devices")
    p.add_argument("--inflight", type=int, default=d("inflight"), help="requests outstanding per client in the closed loop")
    p.add_argument("--seconds", type=float, default=d("seconds"), help="per measurement")
    p.add_argument("--floor", action="store_true", help="also measure a minimal paho + onnxruntime responder")
    p.add_argument("--rounds", type=int, default=d("rounds"),
                   help="interleaved rounds (gateway and floor alternate, order rotated); medians reported")
    p.add_argument("--replicas", type=int, default=d("replicas"),
                   help="gateway processes sharing the requests (started here with --teacher)")
    p.add_argument("--rates", type=_rates, default=(), metavar="R[,R...]",
                   help="also measure at these offered loads (requests/s in total), the same for every responder: "
                        "round trips at equal load (e.g. 300,600)")
    add_json_flag(p)
    p.set_defaults(func=cmd_gateway)


def _rates(text: str) -> tuple[float, ...]:
    """``--rates 300,600``: positive requests/s."""
    try:
        rates = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        rates = ()
    if not rates or not all(0 < r < float("inf") for r in rates):
        raise argparse.ArgumentTypeError(f"{text!r}: give offered loads in requests/s, e.g. 300,600")
    return rates


def cmd_gateway(args: Any) -> int:
    import json
    import tempfile

    from edgecore.clikit import broker_from_args, emit_json

    if args.clients < 1 or args.inflight < 1 or args.seconds <= 0 or args.rounds < 1 or args.replicas < 1:
        raise BenchError("--clients, --inflight, --rounds and --replicas must be >= 1 and --seconds > 0")
    devices, gw = None, None
    if args.credentials:
        try:
            data = json.loads(Path(args.credentials).read_text())
            devices = dict(data["devices"])
            gw = (data["gateway"]["username"], data["gateway"]["password"]) if "gateway" in data else None
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise BenchError(f"{args.credentials}: not a fleet credentials file ({e})") from e
    if args.broker and devices is None:
        raise BenchError("--broker needs --credentials (the devices' passwords)")
    url = broker_from_args(args)
    with tempfile.TemporaryDirectory(prefix="hw-bench-gateway-") as tmp:
        out = run_gateway_bench(broker=url, devices=devices, teacher=args.teacher, clients=args.clients,
                                inflight=args.inflight, seconds=args.seconds, floor=args.floor,
                                gateway_user=gw, workdir=Path(tmp), rounds=args.rounds, replicas=args.replicas,
                                rates=args.rates, prefix=args.prefix)
    _print(out)
    if args.json:
        emit_json(out)
    return 0


def _print(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    load = out["load_average_before"]
    t = Table(title=f"gateway load ({out['clients']} clients x {out['inflight']} in flight, {out['rounds']} "
                    f"interleaved rounds: medians, lost and errors summed; {out['replicas']} gateway process(es)"
                    + (f"; load avg {load[0]:.2f})" if load else ")"))
    for col in ("responder", "max/s", "load", "rate/s", "p50 ms", "p95 ms", "p99 ms", "lost (sum)", "errors (sum)"):
        t.add_column(col)
    for name in ("gateway", "floor"):
        if name in out:
            for lv in out[name]["levels"]:
                load = "fixed" if lv["load"] is None else f"{lv['load']:.0%}"
                t.add_row(name, str(out[name]["max_offloads_per_s"]), load, str(lv["rate"]),
                          str(lv["p50_ms"]), str(lv["p95_ms"]), str(lv["p99_ms"]), str(lv["lost"]), str(lv["errors"]))
    Console(width=140).print(t)
    if "gateway_vs_floor" in out:
        print(f"gateway / floor (max offloads/s): {out['gateway_vs_floor']} (per round: {out['gateway_vs_floor_rounds']})")
    for e in out.get("at_equal_load", []):
        print(f"at {e['rate']}/s offered: p50 gateway {e['gateway_p50_ms']} ms, floor {e['floor_p50_ms']} ms; "
              f"p99 gateway {e['gateway_p99_ms']} ms, floor {e['floor_p99_ms']} ms")
    g = out["goal"]
    print(f"goal {'MET' if g['met'] else 'NOT MET'}: gateway p50 at half load {g['gateway_p50_at_half_load_ms']} ms "
          f"(<= {g['p50_at_half_load_max_ms']})"
          + (f", gateway/floor {g['gateway_vs_floor']} (>= {g['gateway_vs_floor_min']})" if "gateway_vs_floor" in g else ""))
    note = steal_note(out.get("steal_pct"))
    if note:
        print("warning: " + note)
