"""A local MQTT broker for one machine: Mosquitto when installed, else amqtt.

DESIGN's "one machine" deployment (the demo, a lab bench, the tests) needs a
broker with the same security as a fleet's: a password per device and an ACL
that keeps each device under its own ``<prefix>/<id>/`` topics. `MosquittoBroker`
writes that config (passwords hashed by `cloud_gateway.credentials`) and runs
the real Mosquitto; `AmqttBroker` runs amqtt in a thread when Mosquitto is not
installed, so nothing outside pip is needed. amqtt speaks MQTT 3.1.1 only (no
MQTT 5 properties, no shared subscriptions), so a broker says which protocol
its clients must use: `LocalBroker.mqtt_version`.

Past one machine, run a real broker (cluster) with the files that
``cloud-gateway fleet-credentials`` writes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from edgecore.errors import GatewayError

from .credentials import FleetCredentials, write_fleet_files

log = logging.getLogger(__name__)


def find_mosquitto() -> str | None:
    """The mosquitto binary (Debian installs it in /usr/sbin, often not on PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_listening(host: str, port: int, deadline: float, alive: Callable[[], str | None]) -> None:
    while time.monotonic() < deadline:
        why = alive()
        if why is not None:
            raise GatewayError(why)
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise GatewayError(f"broker did not listen on {host}:{port} in time")


class LocalBroker(Protocol):
    host: str
    port: int
    mqtt_version: str  # "5" or "3.1.1": what clients of this broker must speak

    @property
    def url(self) -> str: ...

    def start(self, timeout: float = 10.0) -> None: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class Bridge:
    """A regional broker's link to the core broker the gateways subscribe to (the regional-broker layout,
    docs/gateway.md "Regional brokers").

    Devices connect to their region's broker with their own logins and ACL; the region relays, over one MQTT 5
    connection (``username`` on the core, whose ACL lets it write and read ``<prefix>/#``), what devices publish
    to the core (``out``) and what the gateways answer to the devices (``in``: replies, telemetry
    acknowledgements, commands). MQTT 5 on the bridge keeps the request properties (response topic,
    correlation data, message expiry) the cascade depends on.
    """

    name: str
    host: str
    port: int
    username: str
    password: str

    def conf(self, prefix: str = "fleet") -> str:
        """The ``mosquitto.conf`` lines of this bridge."""
        out = [f"{prefix}/+/{t}" for t in ("infer/req", "telemetry", "status", "bench", "answers")]
        into = [f"{prefix}/+/{t}" for t in ("infer/resp", "telemetry/ack", "cmd")]
        return "\n".join([
            f"connection {self.name}",
            f"address {self.host}:{self.port}",
            "bridge_protocol_version mqttv50",
            f"remote_clientid bridge-{self.name}",
            f"remote_username {self.username}",
            f"remote_password {self.password}",
            "cleansession false",  # the core queues what is meant for this region while the link is down
            "try_private true",
            "restart_timeout 1 10",
            *(f"topic {t} out 1" for t in out),
            *(f"topic {t} in 1" for t in into),
            "",
        ])


class MosquittoBroker:
    """A Mosquitto process with its own config, password file, ACL and persistence.

    ``stop()``/``start()`` restart it on the same port; persistence keeps queued
    QoS 1 messages across the restart.
    """

    mqtt_version = "5"

    def __init__(
        self, root: Path, creds: FleetCredentials, *, prefix: str = "fleet", port: int | None = None,
        host: str = "127.0.0.1", exe: str | None = None, bridge: Bridge | None = None,
    ) -> None:
        exe = exe or find_mosquitto()
        if exe is None:
            raise GatewayError("mosquitto is not installed (apt-get install mosquitto)")
        self.exe = exe
        self.root = Path(root)
        self.host = host
        self.port = port or free_port(host)
        self.creds = creds
        self.prefix = prefix
        self.bridge = bridge  # a regional broker: relays its devices' topics to and from the core
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "mosquitto.log"
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self._write_files()

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _write_files(self) -> None:
        # The same passwd/acl files `cloud-gateway fleet-credentials` writes for a real fleet.
        files = write_fleet_files(self.creds, self.root, prefix=self.prefix)
        (self.root / "mosquitto.conf").write_text(
            "\n".join(
                [
                    "per_listener_settings false",
                    # as root mosquitto would switch to user "mosquitto", who cannot read our files
                    f"user {pwd.getpwuid(os.getuid()).pw_name}",
                    f"listener {self.port} {self.host}",
                    "allow_anonymous false",
                    f"password_file {files['passwd']}",
                    f"acl_file {files['acl']}",
                    "persistence true",
                    f"persistence_location {self.root / 'data'}/",
                    "autosave_interval 1",
                    # a local broker serves a few devices; a fleet's broker needs room for what arrives while
                    # its gateway is away or behind (docs/gateway.md "Fleet scale: ingest": 100,000 for 5,000)
                    "max_queued_messages 10000",
                    "max_packet_size 4194304",
                    "set_tcp_nodelay true",  # else Nagle + delayed ACK add ~40 ms per hop to small replies
                    f"log_dest file {self.log_path}",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "",
                ]
            )
            + (self.bridge.conf(self.prefix) if self.bridge is not None else "")
        )

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart) on the same port; returns once it accepts connections."""
        if self.running:
            return
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.root / "mosquitto.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

        def alive() -> str | None:
            assert self.proc is not None
            if self.proc.poll() is None:
                return None
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            log = self.log_path.read_text() if self.log_path.exists() else ""
            return f"mosquitto exited with {self.proc.returncode}: {err.strip()} {log.strip()[-500:]}"

        try:
            _wait_listening(self.host, self.port, time.monotonic() + timeout, alive)
        except GatewayError:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistence db), SIGKILL if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class AmqttBroker:
    """amqtt in a background thread: the broker when Mosquitto is not installed.

    Same passwords (sha512-crypt file) and the same confinement as the Mosquitto
    ACL, expressed as amqtt's per-user publish/subscribe lists. MQTT 3.1.1 only.
    """

    mqtt_version = "3.1.1"

    def __init__(
        self, root: Path, creds: FleetCredentials, *, prefix: str = "fleet", port: int | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.creds = creds
        self.prefix = prefix
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self) -> dict:
        try:
            import crypt  # amqtt's password file is sha512-crypt; the module is gone from Python 3.13
        except ImportError as e:
            raise GatewayError(
                "the embedded amqtt broker needs Python < 3.13 (its password file uses the crypt module); "
                "install mosquitto instead (apt-get install mosquitto)"
            ) from e

        users = dict(self.creds.devices)
        users[self.creds.gateway[0]] = self.creds.gateway[1]
        users[self.creds.admin[0]] = self.creds.admin[1]
        pw = self.root / "amqtt-passwd"
        pw.write_text(
            "".join(f"{u}:{crypt.crypt(p, crypt.mksalt(crypt.METHOD_SHA512))}\n" for u, p in users.items())
        )
        p = self.prefix
        gw, admin = self.creds.gateway[0], self.creds.admin[0]
        # as the Mosquitto ACL (`credentials.acl_text`): a device writes and reads only its own topics, each in
        # the direction it uses it; it never writes its command topic
        both = ("status", "answers", "input", "input/#")
        publish = {d: [f"{p}/{d}/{t}" for t in ("infer/req", "telemetry", "bench", *both)]
                   for d in self.creds.devices}
        acl = {d: [f"{p}/{d}/{t}" for t in ("infer/resp", "telemetry/ack", "cmd", *both)] for d in self.creds.devices}
        for table in (publish, acl):
            table[gw] = [f"{p}/#"]
            table[admin] = ["#"]
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(pw)},
                # amqtt 0.12's plugin config is its dataclass: `acl` is the subscribe list
                "amqtt.plugins.topic_checking.TopicAccessControlListPlugin": {"publish_acl": publish, "acl": acl},
            },
        }

    def start(self, timeout: float = 10.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        try:
            from amqtt.broker import Broker
        except ImportError as e:
            raise GatewayError(
                "neither mosquitto nor amqtt is installed: apt-get install mosquitto, "
                "or pip install 'edge-toolchain[broker]'"
            ) from e
        config = self._config()
        started = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._broker = Broker(config, loop=loop)
                loop.run_until_complete(self._broker.start())
            except BaseException as e:  # reported by start()
                self._error = e
                started.set()
                return
            started.set()
            loop.run_forever()
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=serve, name="amqtt-broker", daemon=True)
        self._thread.start()
        started.wait(timeout)

        def alive() -> str | None:
            if self._error is None:
                return None
            causes, e = [], self._error
            while e is not None:  # amqtt wraps the real reason (PluginLoadError() has no message)
                causes.append(f"{type(e).__name__}: {e}".rstrip(": "))
                e = e.__cause__
            return "amqtt failed to start: " + " <- ".join(causes)

        _wait_listening(self.host, self.port, time.monotonic() + timeout, alive)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._broker is not None:
            done = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
            try:
                done.result(timeout=10)
            except Exception as e:
                log.warning("amqtt shutdown: %s", e)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._thread = None
        self._loop = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def start_local_broker(
    root: Path, creds: FleetCredentials, *, prefix: str = "fleet", prefer: str = "auto", port: int | None = None,
) -> MosquittoBroker | AmqttBroker:
    """Start Mosquitto if installed (or ``prefer="mosquitto"``), else amqtt; returns it running."""
    if prefer not in ("auto", "mosquitto", "amqtt"):
        raise GatewayError(f"unknown broker {prefer!r}: choose auto, mosquitto or amqtt")
    broker: MosquittoBroker | AmqttBroker
    if prefer == "mosquitto" or (prefer == "auto" and find_mosquitto()):
        broker = MosquittoBroker(Path(root), creds, prefix=prefix, port=port)
    else:
        broker = AmqttBroker(Path(root), creds, prefix=prefix, port=port)
    broker.start()
    return broker
