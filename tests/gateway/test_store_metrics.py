"""Gateway building blocks without a broker: store, Prometheus text, credentials."""

from __future__ import annotations

import base64
import hashlib

import pytest

from cloud_gateway.credentials import acl_text, hash_password, make_fleet
from cloud_gateway.metrics import Metrics
from cloud_gateway.store import GatewayStore
from cloud_gateway.store.database import db_url
from edgecore.errors import GatewayError


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """The store's database on each backend: a SQLite file, a fresh database on a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'x.sqlite'}"
    return request.getfixturevalue("postgres_url")


def test_store_dedupes_windows_and_keeps_order(store_url):
    st = GatewayStore(store_url)
    for seq in (0, 1, 1, 2, 0):
        st.telemetry.add("d1", {"seq": seq, "device_id": "d1", "offload_rate": 0.1 * seq})
    assert st.telemetry.arrival_order("d1") == [0, 1, 2]
    st.devices.set_status("d1", {"state": "online"})
    assert st.devices.get("d1")["status"]["state"] == "online"
    assert [h["seq"] for h in st.telemetry.history("d1", limit=2)] == [1, 2]
    assert st.telemetry.history("d1")[-1]["offload_rate"] == pytest.approx(0.2)
    again = GatewayStore(store_url)  # a second replica on the same database
    assert not again.telemetry.add("d1", {"seq": 2})
    assert [d["device_id"] for d in again.devices.all()] == ["d1"]
    # a device whose state dir was reset counts from 0 again under a new boot id: new windows, not duplicates
    assert again.telemetry.add("d1", {"seq": 0, "boot": "b2"}) and again.telemetry.add("d1", {"seq": 1, "boot": "b2"})
    assert not again.telemetry.add("d1", {"seq": 1, "boot": "b2"})
    assert again.telemetry.arrival_order("d1") == [0, 1, 2, 0, 1]
    again.devices.set_status("d2", {"state": "offline"})  # insert path of the upsert
    assert [d["device_id"] for d in st.devices.all()] == ["d1", "d2"] and st.devices.get("nope") is None


def test_store_urls_and_bad_urls(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.sqlite'}"
    assert db_url(url) == url and db_url(tmp_path / "y.sqlite").startswith("sqlite:////")
    assert db_url("postgresql://u@h/db") == db_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    with pytest.raises(GatewayError, match="cannot open"):
        GatewayStore("nosuchdialect://x")
    with pytest.raises(GatewayError, match=r"cannot open telemetry store postgresql\+psycopg://u:\*\*\*@127.0.0.1:1/db"):
        GatewayStore("postgresql://u:secret@127.0.0.1:1/db")  # nothing listens; the password is not echoed


def test_prometheus_text():
    m = Metrics(per_device=True)
    m.inc("req_total", "Requests", device='a"b')
    m.inc("req_total", "Requests", 2, device='a"b')
    m.set("rate", "Rate", 0.25, device="a")
    for v in (0.0004, 0.003, 0.003, 10.0):
        m.observe("lat_seconds", "Latency", v)
    text = m.render()
    assert '# TYPE req_total counter' in text and 'req_total{device="a\\"b"} 3' in text
    assert 'rate{device="a"} 0.25' in text
    assert 'lat_seconds_bucket{le="0.0005"} 1' in text and 'lat_seconds_bucket{le="0.005"} 3' in text
    assert 'lat_seconds_bucket{le="+Inf"} 4' in text and "lat_seconds_count 4" in text
    assert m.hist_count("lat_seconds") == 4 and m.value("req_total", device='a"b') == 3


def _fleet_metrics(n: int, **kw) -> Metrics:
    m = Metrics(**kw)
    for i in range(n):
        d = f"dev-{i}"
        m.note_line(d, "digits" if i % 2 else "parts")
        m.inc("windows_total", "Windows", device=d)
        m.observe("req_seconds", "Latency", 0.003, device=d)
        m.set("device_offload_rate", "Offload", 0.1, device=d)
    m.inc("windows_total", "Windows", device="never-said")  # no status yet: its line is unknown
    m.inc("overload_total", "Overload")
    return m


def test_metrics_are_summed_per_model_line_unless_per_device_is_asked():
    text = _fleet_metrics(5000).render()
    assert 'windows_total{line="digits"} 2500' in text and 'windows_total{line="parts"} 2500' in text
    assert 'windows_total{line="unknown"} 1' in text and "overload_total 1" in text
    assert 'req_seconds_count{line="digits"} 2500' in text and 'req_seconds_bucket{line="parts",le="0.005"} 2500' in text
    assert "device=" not in text and "device_offload_rate{" not in text  # a device's gauge is not summed
    assert len(text.splitlines()) < 60  # a handful of series, whatever the fleet's size
    # in process every device keeps its own numbers
    m = _fleet_metrics(10)
    assert m.value("windows_total", device="dev-3") == 1 and m.hist_count("req_seconds", device="dev-3") == 1


def test_metrics_per_device_when_asked():
    text = _fleet_metrics(50, per_device=True).render()
    assert 'windows_total{device="dev-7"} 1' in text and 'device_offload_rate{device="dev-7"} 0.1' in text
    assert "line=" not in text and len(text.splitlines()) > 50 * 15


def test_metrics_render_does_not_hold_the_lock_while_formatting(monkeypatch):
    """A scrape of a big fleet must not stall the threads that count (ingest, the MQTT thread): the numbers are
    copied under the lock and the text is made after it is released."""
    import cloud_gateway.metrics as metrics_mod

    m = _fleet_metrics(200, per_device=True)
    held: list[bool] = []
    real = metrics_mod._fmt_labels
    monkeypatch.setattr(metrics_mod, "_fmt_labels", lambda *a: (held.append(m._lock.locked()), real(*a))[1])
    assert 'windows_total{device="dev-1"} 1' in m.render()
    assert held and not any(held)


def test_password_hash_is_mosquitto_pbkdf2_sha512():
    h = hash_password("secret", salt=base64.b64decode("PKrODV9OApe7tN3Z"))
    # the line `mosquitto_passwd -b pw alice secret` wrote with that salt
    assert h == ("$7$101$PKrODV9OApe7tN3Z$ywxQnev4D5p/CuE2IGpB0yBA4GpftsdB6W3Tew9c1y5p5FrTIN7ZadlHk8efPbagY6jlW"
                 "+19izL2dD8aVaRvww==")
    _, _, it, salt, digest = h.split("$")
    assert base64.b64decode(digest) == hashlib.pbkdf2_hmac("sha512", b"secret", base64.b64decode(salt), int(it))
    assert "pattern read fleet/%u/cmd" in acl_text() and "pattern write fleet/%u/cmd" not in acl_text()
    with pytest.raises(GatewayError, match="collides"):
        make_fleet(device_ids=["gateway"])
    with pytest.raises(GatewayError, match="duplicate"):
        make_fleet(device_ids=["a", "a"])
    # one random password in 64 started with "-", which a command line reads as an option
    creds = make_fleet(device_ids=[f"d{i}" for i in range(1000)])
    assert not any(pw.startswith("-") for pw in [*creds.devices.values(), creds.gateway[1], creds.admin[1]])
