"""The agent's MQTT link: paho-mqtt 2 (callback API v2), MQTT 5, auto-reconnect.

Small on purpose: connect with credentials and a retained last will, keep a
connection generation counter (so callers can tell a reconnect happened),
resubscribe on every connect, and publish QoS 1 messages with MQTT 5
properties. Everything else (routing, outbox) lives above it.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable
from urllib.parse import parse_qs, urlencode, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgecore.errors import AgentError

if TYPE_CHECKING:
    import argparse

log = logging.getLogger(__name__)

MessageHandler = Callable[[mqtt.MQTTMessage], None]


def set_nodelay(client: mqtt.Client) -> None:
    """Disable Nagle on the client socket (paho does not).

    Requests and replies are small packets sent right after others; with Nagle
    plus the peer's delayed ACK each hop waits ~40 ms, which is most of a
    cloud round trip on a LAN.
    """
    sock = client.socket()
    if sock is not None and hasattr(sock, "setsockopt"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not a TCP socket (e.g. a unix socket or a TLS wrapper that refuses)
            pass


def mqtt_protocol(version: str) -> int:
    """"5" (default: correlation data, response topics, shared subscriptions) or "3.1.1"."""
    if version in ("5", "5.0"):
        return mqtt.MQTTv5
    if version in ("3.1.1", "311"):
        return mqtt.MQTTv311
    raise AgentError(f"MQTT version {version!r}: choose 5 or 3.1.1")


@dataclass(frozen=True)
class TlsFiles:
    """TLS for ``mqtts://``: the CA that signed the broker's certificate (None: the system's CAs),
    and optionally a client certificate and key for brokers that require one."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


_TLS_PARAMS = {"ca": "ca_file", "cert": "cert_file", "key": "key_file"}


@dataclass(frozen=True)
class BrokerAddress:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]?ca=FILE&cert=FILE&key=FILE`` (TLS files optional).

    The TLS files travel in the URL so that every client (agent, gateway, bench)
    gets them through the one string it already takes; `broker_url` adds them.
    """

    host: str
    port: int
    tls: TlsFiles | None = None

    @classmethod
    def parse(cls, url: str) -> "BrokerAddress":
        u = urlparse(url if "://" in url else f"mqtt://{url}")
        secure = u.scheme in ("mqtts", "ssl")
        if u.scheme not in ("mqtt", "tcp", "mqtts", "ssl") or not u.hostname:
            raise AgentError(f"broker URL {url!r} must look like mqtt://host:port or mqtts://host:port")
        q = parse_qs(u.query)
        unknown = set(q) - set(_TLS_PARAMS)
        if unknown:
            raise AgentError(f"broker URL {url!r}: unknown parameter(s) {sorted(unknown)} (known: ca, cert, key)")
        if q and not secure:
            raise AgentError(f"broker URL {url!r}: CA or client certificate files need an mqtts:// URL")
        files = {_TLS_PARAMS[k]: v[-1] for k, v in q.items()}
        if ("cert_file" in files) != ("key_file" in files):
            raise AgentError("a client certificate needs both --cert-file and --key-file")
        try:
            port = u.port or (8883 if secure else 1883)
        except ValueError as e:
            raise AgentError(f"broker URL {url!r}: {e}") from e
        return cls(u.hostname, port, TlsFiles(**files) if secure else None)

    def configure(self, client: mqtt.Client) -> None:
        """Turn on TLS on ``client`` when this is an ``mqtts://`` address (certificate and hostname checked)."""
        if self.tls is None:
            return
        for what, path in (("CA file", self.tls.ca_file), ("client certificate", self.tls.cert_file),
                           ("client key", self.tls.key_file)):
            if path is not None and not os.access(path, os.R_OK):
                raise AgentError(f"{what} {path} does not exist or is not readable")
        try:
            client.tls_set(ca_certs=self.tls.ca_file, certfile=self.tls.cert_file, keyfile=self.tls.key_file,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except (ssl.SSLError, OSError, ValueError) as e:
            raise AgentError(f"cannot use the TLS files {self.tls}: {e}") from e


def broker_url(url: str, *, ca_file: str | os.PathLike[str] | None = None,
               cert_file: str | os.PathLike[str] | None = None,
               key_file: str | os.PathLike[str] | None = None) -> str:
    """``url`` with the CLIs' ``--ca-file``/``--cert-file``/``--key-file`` added (as absolute paths)."""
    params = {k: os.path.abspath(v) for k, v in (("ca", ca_file), ("cert", cert_file), ("key", key_file)) if v}
    if not params:
        return url
    sep = "&" if "?" in url else "?"
    out = url + sep + urlencode(params)
    BrokerAddress.parse(out)  # refuse mqtt:// with TLS files now, with the message that says why
    return out


def add_tls_args(parser: "argparse.ArgumentParser") -> None:
    """``--ca-file``, ``--cert-file``, ``--key-file`` for a CLI that takes ``--broker``."""
    parser.add_argument("--ca-file", help="CA certificate (PEM) the mqtts:// broker's certificate is checked "
                                          "against (default: the system's CAs)")
    parser.add_argument("--cert-file", help="client certificate (PEM), for brokers that require one")
    parser.add_argument("--key-file", help="client private key (PEM) for --cert-file")


class MqttLink:
    def __init__(
        self,
        *,
        url: str,
        client_id: str,
        username: str | None,
        password: str | None,
        will: tuple[str, bytes] | None = None,
        keepalive: int = 10,
        mqtt_version: str = "5",
    ) -> None:
        self.address = BrokerAddress.parse(url)
        self.v5 = mqtt_protocol(mqtt_version) == mqtt.MQTTv5
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt_protocol(mqtt_version),
        )
        self.anonymous = username is None
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.address.configure(self.client)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.max_inflight_messages_set(100)
        self.keepalive = keepalive
        self._subs: dict[str, MessageHandler] = {}
        self._on_connect_hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self.generation = 0  # incremented on every successful connect
        self.last_error: str | None = None
        self.refused = False
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # --- lifecycle -------------------------------------------------------------
    def start(self, *, wait: float | None = 10.0) -> None:
        try:
            self.client.connect_async(self.address.host, self.address.port, keepalive=self.keepalive)
        except (OSError, ValueError) as e:
            raise AgentError(f"cannot reach broker {self.address.host}:{self.address.port}: {e}") from e
        self.client.loop_start()
        if wait is None:
            return
        end = time.monotonic() + wait
        while not self.connected.wait(0.05):
            if self.refused or time.monotonic() > end:  # refused credentials will not get better
                why = self.last_error or "no answer"
                self.stop()
                raise AgentError(f"could not connect to broker {self.address.host}:{self.address.port}: {why}")

    def stop(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
            self.connected.clear()

    def on_connect(self, hook: Callable[[], None]) -> None:
        self._on_connect_hooks.append(hook)

    def subscribe(self, topic: str, handler: MessageHandler, *, qos: int = 1) -> None:
        with self._lock:
            self._subs[topic] = handler
        if self.connected.is_set():
            self.client.subscribe(topic, qos=qos)

    # --- publishing ------------------------------------------------------------
    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        expiry_s: int | None = None,
        user: list[tuple[str, str]] | None = None,
    ) -> mqtt.MQTTMessageInfo:
        """``user``: MQTT 5 user properties (dropped on 3.1.1, which has none)."""
        props = None
        if self.v5 and (response_topic or correlation or expiry_s or user):
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation:
                props.CorrelationData = correlation
            if expiry_s:
                props.MessageExpiryInterval = int(expiry_s)
            if user:
                props.UserProperty = user
        return self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)

    # --- callbacks -------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            auth = any(w in str(reason_code).lower() for w in ("authori", "password"))
            hint = ""
            if auth:
                hint = (" (check the username and password, or the credentials file)" if self.anonymous is False else
                        " (this broker does not take anonymous clients: give --password,"
                        " $DEVICE_AGENT_PASSWORD or --credentials)")
            self.last_error = f"the broker refused the login: {reason_code}{hint}"
            self.refused = True
            log.warning("broker refused connection: %s", reason_code)
            return
        set_nodelay(client)
        with self._lock:
            subs = list(self._subs)
        for t in subs:
            client.subscribe(t, qos=1)
        self.generation += 1
        self.last_error = None
        self.connected.set()
        for hook in self._on_connect_hooks:
            try:
                hook()
            except Exception:  # a hook must not kill the network thread
                log.exception("on-connect hook failed")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self.connected.clear()
        failed = reason_code.is_failure if hasattr(reason_code, "is_failure") else reason_code
        if failed and not self.refused:  # keep the refusal's reason: it says what to fix
            self.last_error = f"disconnected: {reason_code}"

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            handlers = [h for t, h in self._subs.items() if mqtt.topic_matches_sub(t, msg.topic)]
        for h in handlers:
            try:
                h(msg)
            except Exception:
                log.exception("handler for %s failed", msg.topic)
