"""MQTT over TLS (``mqtts://``) against a real Mosquitto with a certificate this test makes."""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud_gateway.broker import free_port
from device_agent.agent import summarize
from edgecore.errors import AgentError, BrokerError
from edgecore.mqtt import BrokerAddress, broker_url
from tests.agent.tiny import items, make_agent, start_gateway

pytestmark = pytest.mark.broker


def _pki(root: Path, name: str = "ca") -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost, and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def cert(cn, key, issuer_cn, issuer_key, *, ca=False, san=None, usage=None):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), True)
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(stem, key, crt):
        (root / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
        (root / f"{stem}.crt").write_bytes(crt.public_bytes(serialization.Encoding.PEM))

    root.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    write("ca", ca_key, cert(f"{name} test CA", ca_key, f"{name} test CA", ca_key, ca=True))
    srv_key = ec.generate_private_key(ec.SECP256R1())
    write("server", srv_key, cert("127.0.0.1", srv_key, f"{name} test CA", ca_key,
                                  san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                                  usage=ExtendedKeyUsageOID.SERVER_AUTH))
    cl_key = ec.generate_private_key(ec.SECP256R1())
    write("client", cl_key, cert("client", cl_key, f"{name} test CA", ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH))
    return {k: root / f"{k}.crt" for k in ("ca", "server", "client")} | {"client_key": root / "client.key",
                                                                         "server_key": root / "server.key"}


def _tls_listeners(broker, pki) -> tuple[int, int]:
    """Add two TLS listeners to the fixture's broker (restarted): one server-auth only, one requiring a client cert."""
    p1, p2 = free_port(), free_port()
    conf = broker.root / "mosquitto.conf"
    text = conf.read_text()
    for port, need_client in ((p1, False), (p2, True)):
        text += (f"listener {port} 127.0.0.1\ncafile {pki['ca']}\ncertfile {pki['server']}\n"
                 f"keyfile {pki['server_key']}\nrequire_certificate {'true' if need_client else 'false'}\n")
    conf.write_text(text)
    broker.stop()
    broker.start()
    return p1, p2


def _connects(url: str, creds) -> bool:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"t-{time.monotonic_ns()}",
                    protocol=mqtt.MQTTv5)
    c.username_pw_set(*creds)
    addr = BrokerAddress.parse(url)
    addr.configure(c)
    try:
        c.connect(addr.host, addr.port)
        for _ in range(20):
            c.loop(timeout=0.1)
            if c.is_connected():
                return True
        return False
    except OSError:  # ssl.SSLError is an OSError: certificate refused either way
        return False
    finally:
        c.disconnect()


def test_agent_and_gateway_over_tls_with_the_test_ca(mosquitto, tiny_cascade, tmp_path):
    pki = _pki(tmp_path / "pki")
    tls_port, mtls_port = _tls_listeners(mosquitto, pki)
    url = broker_url(f"mqtts://127.0.0.1:{tls_port}", ca_file=pki["ca"])

    class TlsBroker:  # the fixture's broker, reached through its TLS listener
        host, port = "127.0.0.1", tls_port
        gateway_credentials = mosquitto.gateway_credentials
        credentials = staticmethod(mosquitto.credentials)

    TlsBroker.url = url
    with start_gateway(TlsBroker, tiny_cascade, tmp_path, http=False) as gw:
        with make_agent(TlsBroker, tiny_cascade.bundle_dir, "dev-a", tmp_path, threshold=1.01, deadline_s=2) as a:
            s = summarize(list(a.run(items(tiny_cascade.x_test[:20]))))
    assert s["cloud"] == 20 and gw.worker.served == 20

    # client certificates: required on the second listener
    creds = mosquitto.credentials("dev-b")
    mtls = f"mqtts://127.0.0.1:{mtls_port}"
    assert _connects(broker_url(mtls, ca_file=pki["ca"], cert_file=pki["client"], key_file=pki["client_key"]), creds)
    assert not _connects(broker_url(mtls, ca_file=pki["ca"]), creds)

    # a broker certificate from another CA is refused, with an error that says so
    other = _pki(tmp_path / "other", name="other")
    assert not _connects(broker_url(f"mqtts://127.0.0.1:{tls_port}", ca_file=other["ca"]), creds)
    with pytest.raises(AgentError, match="could not connect"):
        make_agent(type("B", (TlsBroker,), {"url": broker_url(f"mqtts://127.0.0.1:{tls_port}", ca_file=other["ca"])}),
                   tiny_cascade.bundle_dir, "dev-c", tmp_path, deadline_s=1).start()


def test_tls_url_errors_are_clear(tmp_path):
    with pytest.raises(BrokerError, match="need an mqtts:// URL"):
        broker_url("mqtt://h:1883", ca_file=tmp_path / "ca.pem")
    with pytest.raises(BrokerError, match="both --cert-file and --key-file"):
        broker_url("mqtts://h", cert_file=tmp_path / "c.pem")
    assert BrokerAddress.parse("mqtts://h").port == 8883 and BrokerAddress.parse("mqtts://h").tls.ca_file is None
    addr = BrokerAddress.parse(broker_url("mqtts://h:1", ca_file=tmp_path / "missing.pem"))
    with pytest.raises(BrokerError, match="missing.pem does not exist"):
        addr.configure(mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2))
