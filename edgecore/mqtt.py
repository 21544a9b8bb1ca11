"""The one MQTT link every client of the project uses: agent, gateway, bench.

paho-mqtt 2 (callback API v2), MQTT 5 or 3.1.1, TLS from the broker URL, a
username and password, an optional retained last will, session expiry,
auto-reconnect, TCP_NODELAY, resubscription on every connect, and QoS 1
publishing with MQTT 5 properties. A connection generation counter lets callers
tell that a reconnect happened; ``ready`` (and the `on_ready` hooks) follow the
broker's acknowledgement (SUBACK) of the subscriptions made at connect, so a
client announces itself only once it can hear what it subscribed to.

paho is imported inside the functions and classes that need it: importing
``edgecore`` never needs it (the foundation stays free of third parties).
Routing, outboxes, batching and the topic scheme (`edgecore.wire.Topics`) live
above it.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qs, urlencode, urlparse

from edgecore.errors import BrokerError

log = logging.getLogger(__name__)

#: the protocol every client speaks unless told otherwise ("3.1.1" for brokers without MQTT 5)
DEFAULT_VERSION = "5"
VERSIONS = ("5", "3.1.1")

#: a message handler: called on the network thread with paho's ``MQTTMessage``
MessageHandler = Callable[[Any], None]


def set_nodelay(client: Any) -> None:
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


def mqtt_protocol(version: str) -> Any:
    """paho's protocol number for "5" (correlation data, response topics, shared subscriptions) or "3.1.1"."""
    import paho.mqtt.client as mqtt

    if version in ("5", "5.0"):
        return mqtt.MQTTv5
    if version in ("3.1.1", "311"):
        return mqtt.MQTTv311
    raise BrokerError(f"MQTT version {version!r}: choose 5 or 3.1.1")


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
            raise BrokerError(f"broker URL {url!r} must look like mqtt://host:port or mqtts://host:port")
        q = parse_qs(u.query)
        unknown = set(q) - set(_TLS_PARAMS)
        if unknown:
            raise BrokerError(f"broker URL {url!r}: unknown parameter(s) {sorted(unknown)} (known: ca, cert, key)")
        if q and not secure:
            raise BrokerError(f"broker URL {url!r}: CA or client certificate files need an mqtts:// URL")
        files = {_TLS_PARAMS[k]: v[-1] for k, v in q.items()}
        if ("cert_file" in files) != ("key_file" in files):
            raise BrokerError("a client certificate needs both --cert-file and --key-file")
        try:
            port = u.port or (8883 if secure else 1883)
        except ValueError as e:
            raise BrokerError(f"broker URL {url!r}: {e}") from e
        return cls(u.hostname, port, TlsFiles(**files) if secure else None)

    def configure(self, client: Any) -> None:
        """Turn on TLS on ``client`` when this is an ``mqtts://`` address (certificate and hostname checked)."""
        if self.tls is None:
            return
        for what, path in (("CA file", self.tls.ca_file), ("client certificate", self.tls.cert_file),
                           ("client key", self.tls.key_file)):
            if path is not None and not os.access(path, os.R_OK):
                raise BrokerError(f"{what} {path} does not exist or is not readable")
        try:
            client.tls_set(ca_certs=self.tls.ca_file, certfile=self.tls.cert_file, keyfile=self.tls.key_file,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except (ssl.SSLError, OSError, ValueError) as e:
            raise BrokerError(f"cannot use the TLS files {self.tls}: {e}") from e


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


def shared_filter_topic(topic_filter: str) -> str:
    """The topic filter a ``$share/<group>/<filter>`` subscription matches messages against."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else topic_filter
    return topic_filter


class MqttLink:
    """One broker connection: connect (TLS, login, will, session), resubscribe, dispatch, publish.

    ``connected`` is set from the broker's CONNACK until the connection drops;
    ``ready`` once the subscriptions made at (re)connect are acknowledged, and the
    `on_ready` hooks run then. A refused login sets ``refused`` and keeps its
    reason in ``last_error`` (it will not get better by retrying).
    """

    def __init__(
        self,
        *,
        url: str,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        will: tuple[str, bytes] | None = None,
        keepalive: int = 10,
        mqtt_version: str = DEFAULT_VERSION,
        session_expiry_s: int | None = None,
        max_inflight: int | None = None,
        anonymous_hint: str = "give a password or a credentials file",
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.url = url
        self.address = BrokerAddress.parse(url)
        protocol = mqtt_protocol(mqtt_version)
        self.v5 = protocol == mqtt.MQTTv5
        self.session_expiry_s = session_expiry_s
        # 3.1.1 has no session expiry: a clean session is the closest to "expires at once", a kept one to the rest
        clean = None if self.v5 or session_expiry_s is None else session_expiry_s == 0
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=protocol, clean_session=clean)
        self.anonymous = username is None
        self._anonymous_hint = anonymous_hint
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.address.configure(self.client)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        if max_inflight is not None:
            self.client.max_inflight_messages_set(max_inflight)
        self.keepalive = keepalive
        self._subs: dict[str, tuple[int, MessageHandler]] = {}
        self._dispatch: tuple[tuple[str, MessageHandler], ...] = ()  # (match filter, handler): read lock-free
        self._ready_hooks: list[Callable[[], None]] = []
        self._disconnect_hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._acked = threading.Condition()
        self._subacks: dict[int, list[Any]] = {}  # mid -> reason codes, for subscribe(wait=...)
        self._connect_mid: int | None = None
        self.connected = threading.Event()
        self.ready = threading.Event()
        self.generation = 0  # incremented on every successful connect
        self.last_error: str | None = None
        self.refused = False
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    @property
    def where(self) -> str:
        return f"{self.address.host}:{self.address.port}"

    # --- lifecycle -------------------------------------------------------------
    def start(self, *, wait: float | None = 10.0, offline_ok: bool = False) -> bool:
        """Connect and run the network thread; True once connected (and subscribed), False when offline.

        ``wait``: seconds to wait for the broker's answer (None: return at once, the thread keeps trying).
        A refused login, a TLS failure or a bad address raise `BrokerError`. An unreachable broker raises too,
        unless ``offline_ok``: then this returns False and the network thread connects when the broker appears.
        """
        kw: dict[str, Any] = {}
        if self.v5 and self.session_expiry_s is not None:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
            kw = {"clean_start": self.session_expiry_s == 0, "properties": props}
        host, port = self.address.host, self.address.port
        try:
            # the first attempt in this thread: its error says whether retrying can help (refused TCP: yes)
            self.client.connect(host, port, keepalive=self.keepalive, **kw)
        except ssl.SSLError as e:  # a certificate the CA does not vouch for will not get better
            raise BrokerError(f"could not connect to broker {self.where}: TLS: {e}") from e
        except ValueError as e:
            raise BrokerError(f"broker {self.where}: {e}") from e
        except OSError as e:
            self.last_error = f"unreachable: {e.strerror or e}"
            if not offline_ok:
                raise BrokerError(f"could not connect to broker {self.where}: {self.last_error}") from e
            self.client.connect_async(host, port, keepalive=self.keepalive, **kw)  # retried by the network thread
            self.client.loop_start()
            log.warning("broker %s is %s; working without it and connecting when it appears", self.where,
                        self.last_error)
            return False
        self.client.loop_start()
        if wait is None:
            return False
        end = time.monotonic() + wait
        while not self.ready.wait(0.02):
            if self.refused or time.monotonic() > end:  # refused credentials will not get better
                why = self.last_error or "no answer"
                if offline_ok and not self.refused:
                    log.warning("broker %s did not answer in %.0f s (%s); working without it meanwhile",
                                self.where, wait, why)
                    return False
                self.stop()
                raise BrokerError(f"could not connect to broker {self.where}: {why}")
        return True

    def stop(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
            self.connected.clear()
            self.ready.clear()

    def on_ready(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` (on the network thread) after every connect, once its subscriptions are acknowledged."""
        self._ready_hooks.append(hook)

    def on_disconnect(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` (on the network thread) after ``connected`` cleared, whenever the connection goes."""
        self._disconnect_hooks.append(hook)

    def subscribe(self, topic: str, handler: MessageHandler, *, qos: int = 1, wait: float | None = None) -> bool:
        """Subscribe now (when connected) and after every reconnect; ``handler`` gets the matching messages.

        ``wait``: seconds to wait for the broker's SUBACK; returns whether it came (and granted the
        subscription). Without ``wait``, or while not connected, returns False at once.
        """
        with self._lock:
            self._subs[topic] = (qos, handler)
            self._dispatch = tuple((shared_filter_topic(t), h) for t, (_, h) in self._subs.items())
        if not self.connected.is_set():
            return False
        rc, mid = self.client.subscribe(topic, qos=qos)
        if wait is None or rc != 0:
            return False
        end = time.monotonic() + wait
        with self._acked:
            while mid not in self._subacks:
                left = end - time.monotonic()
                if left <= 0 or not self._acked.wait(left):
                    return False
            return not any(getattr(r, "is_failure", False) for r in self._subacks.pop(mid))

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            self._subs.pop(topic, None)
            self._dispatch = tuple((shared_filter_topic(t), h) for t, (_, h) in self._subs.items())
        if self.connected.is_set():
            self.client.unsubscribe(topic)

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
    ) -> Any:
        """Publish; paho's ``MQTTMessageInfo`` back. MQTT 5 properties are dropped on 3.1.1, which has none."""
        props = None
        if self.v5 and (response_topic or correlation or expiry_s or user):
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

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
                hint = (" (check the username and password, or the credentials file)" if not self.anonymous else
                        f" (this broker does not take anonymous clients: {self._anonymous_hint})")
            self.last_error = f"the broker refused the login: {reason_code}{hint}"
            self.refused = True
            log.warning("broker %s refused the connection: %s", self.where, reason_code)
            return
        set_nodelay(client)
        with self._lock:
            subs = [(t, q) for t, (q, _) in self._subs.items()]
        self.generation += 1
        self.last_error = None
        self.refused = False
        self._connect_mid = None
        if subs:
            rc, mid = client.subscribe(subs)
            if rc == 0:
                self._connect_mid = mid
        self.connected.set()
        if self._connect_mid is None:  # nothing to wait for
            self._now_ready()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # type: ignore[no-untyped-def]
        failed = [str(r) for r in reason_codes if getattr(r, "is_failure", False)]
        if failed:
            log.warning("broker %s refused a subscription: %s", self.where, ", ".join(failed))
        if mid == self._connect_mid:
            self._connect_mid = None
            self._now_ready()
            return
        with self._acked:
            self._subacks[mid] = list(reason_codes)
            self._acked.notify_all()

    def _now_ready(self) -> None:
        self.ready.set()
        for hook in self._ready_hooks:
            try:
                hook()
            except Exception:  # a hook must not kill the network thread
                log.exception("on-ready hook failed")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self.connected.clear()
        self.ready.clear()
        failed = reason_code.is_failure if hasattr(reason_code, "is_failure") else reason_code
        if failed and not self.refused:  # keep the refusal's reason: it says what to fix
            self.last_error = f"disconnected: {reason_code}"
        for hook in self._disconnect_hooks:
            try:
                hook()
            except Exception:
                log.exception("on-disconnect hook failed")

    def _on_message(self, client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        subs = self._dispatch
        if len(subs) == 1:  # the broker sends only what matches our one subscription
            handlers = [subs[0][1]]
        else:
            from paho.mqtt.client import topic_matches_sub

            handlers = [h for t, h in subs if topic_matches_sub(t, msg.topic)]
        for h in handlers:
            try:
                h(msg)
            except Exception:
                log.exception("handler for %s failed", msg.topic)
