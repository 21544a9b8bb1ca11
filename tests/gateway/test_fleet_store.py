"""The store at fleet scale: batched window writes, the paged device list, the fleet summary, retention.

On SQLite and on a real PostgreSQL server (skipped without one, failed under CI=true)."""

from __future__ import annotations

import pytest

from cloud_gateway.store import GatewayStore
from cloud_gateway.store.devices import DeviceQuery


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return GatewayStore(f"sqlite:///{tmp_path / 'x.sqlite'}")
    return GatewayStore(request.getfixturevalue("postgres_url"))


def _window(seq: int, *, boot: str = "b", t_end: float = 1000.0, offload: float = 0.1, inputs: int = 100,
            edge_p95: float | None = 0.002, drift: bool = False) -> dict:
    return {"schema": 1, "seq": seq, "boot": boot, "t_end": t_end, "offload_rate": offload, "fallback_rate": 0.0,
            "counts": {"inputs": inputs}, "latency": {"edge": {"p95": edge_p95}, "cloud_rtt": {"p95": 0.01}},
            "drift": {"flag": drift}}


def test_a_batch_of_windows_is_one_transaction_and_dedupes(store, monkeypatch):
    new = store.telemetry.add_many([("a", _window(1)), ("a", _window(2)), ("a", _window(1)), ("b", _window(1))])
    assert new == [True, True, False, True]  # the repeat inside the batch is a redelivery too
    assert store.telemetry.add_many([("a", _window(2)), ("a", _window(3))]) == [False, True]
    assert store.telemetry.arrival_order("a") == [1, 2, 3]
    assert store.devices.get("a")["last_telemetry"]["seq"] == 3  # the newest window is the device's last
    # one transaction: a batch the database refuses stores nothing of it (no window acknowledged, all resent)
    def fail(*a, **kw):  # the database fails after the windows were inserted, before the commit
        raise RuntimeError("database gone")

    monkeypatch.setattr(store.devices, "set_last_telemetry_many", fail)
    with pytest.raises(RuntimeError):
        store.telemetry.add_many([("a", _window(4)), ("a", _window(5))])
    assert store.telemetry.arrival_order("a") == [1, 2, 3]


def test_statuses_in_one_statement_keep_the_line_and_bundle_through_an_offline_will(store):
    store.devices.set_statuses([("a", {"state": "online", "model": "digits", "version": "1",
                                       "bundle_sha256": "ab" * 32}),
                                ("b", {"state": "online", "model": "parts"}), ("a", {"state": "online",
                                                                                     "model": "digits",
                                                                                     "version": "2"})])
    store.devices.set_statuses([("a", {"state": "offline"})])
    a = store.devices.get("a")
    assert (a["state"], a["model_line"], a["version"], a["status"]) == ("offline", "digits", "2", {"state": "offline"})


def _fleet(store, n: int = 30) -> None:
    store.devices.set_statuses([(f"d{i:03d}", {"state": "online" if i % 3 else "offline",
                                               "model": "digits" if i % 2 else "parts", "version": str(i % 4 // 2 + 1)})
                                for i in range(n)])
    store.telemetry.add_many([(f"d{i:03d}", _window(1, offload=i / 100, edge_p95=(i + 1) / 1000, drift=i % 5 == 0))
                              for i in range(n) if i != 7])  # d007 sent no telemetry yet


def test_device_pages_are_keyset_paged_sorted_and_filtered(store):
    _fleet(store)
    for sort in ("device_id", "-device_id", "offload_rate", "-offload_rate", "edge_p95", "-edge_p95", "state"):
        seen, cursor = [], None
        while True:
            rows, cursor, total = store.devices.page(DeviceQuery(limit=7, sort=sort, cursor=cursor))
            seen += [r["device_id"] for r in rows]
            if cursor is None:
                break
        assert total == 30 and len(seen) == 30 and len(set(seen)) == 30, sort  # each device once, none skipped
        if sort.lstrip("-") == "offload_rate":
            rates = [store.devices.get(d)["offload_rate"] for d in seen if d != "d007"]
            assert rates == sorted(rates, reverse=sort.startswith("-")), sort
    assert store.devices.page(DeviceQuery(limit=1, sort="-edge_p95"))[0][0]["device_id"] == "d029"
    online = store.devices.page(DeviceQuery(limit=100, state="online"))
    assert online[2] == 20 and all(r["state"] == "online" for r in online[0])
    assert store.devices.page(DeviceQuery(limit=100, state="offline"))[2] == 10
    assert store.devices.page(DeviceQuery(limit=100, drifting=True))[2] == 6
    assert store.devices.page(DeviceQuery(limit=100, line="parts", state="online"))[2] == 10
    assert store.devices.page(DeviceQuery(limit=100, bundle="2"))[2] == 14
    assert [r["device_id"] for r in store.devices.page(DeviceQuery(q="d01"))[0]] == [f"d01{i}" for i in range(10)]
    with pytest.raises(ValueError, match="sort"):
        store.devices.page(DeviceQuery(sort="status"))
    with pytest.raises(ValueError, match="cursor"):
        store.devices.page(DeviceQuery(cursor="garbage"))


def test_fleet_summary_counts_rates_and_percentiles(store):
    _fleet(store)
    s = store.devices.summary()
    assert (s["devices"], s["online"], s["offline"], s["unknown"], s["drifting"]) == (30, 20, 10, 0, 6)
    # each device's last window weighted by its inputs (100 each): the mean of i/100 over the 29 that sent one
    assert s["offload_rate"] == pytest.approx(sum(i / 100 for i in range(30) if i != 7) / 29)
    # nearest rank across the 29 devices' edge p95s (1..30 ms without d007's 8 ms)
    ranked = sorted((i + 1) / 1000 for i in range(30) if i != 7)
    assert s["latency"]["edge_p95"] == {"p50": ranked[14], "p95": ranked[27], "p99": ranked[28]}
    groups = {(g["model_line"], g["version"]): g for g in s["groups"]}
    assert sum(g["devices"] for g in groups.values()) == 30 and set(groups) == {
        ("digits", "1"), ("digits", "2"), ("parts", "1"), ("parts", "2")}
    g = groups[("parts", "1")]  # i even, i % 4 in (0, 1): 0, 4, 8, ..., 28
    members = [i for i in range(30) if i % 2 == 0 and i % 4 < 2]
    assert g["devices"] == len(members) and g["latency"]["edge_p95"]["p99"] == (max(members) + 1) / 1000


def test_retention_deletes_old_windows_in_chunks_and_keeps_them_hourly(store):
    hour = 500_000  # hours since the epoch
    windows = [("a", _window(i, t_end=hour * 3600.0 + 60 * i, offload=0.1 * (i % 3), inputs=10 + i,
                             edge_p95=i / 1000, drift=i % 4 == 0)) for i in range(25)]
    windows += [("b", _window(1, t_end=(hour + 1) * 3600.0 + 5, offload=0.5, inputs=8, edge_p95=None))]
    store.telemetry.add_many(windows)
    cutoff = hour * 3600.0 + 60 * 20  # a's windows 0..19 and nothing of b's
    assert store.telemetry.delete_before(cutoff, limit=8) == 8
    assert store.telemetry.delete_before(cutoff, limit=8) == 8
    assert store.telemetry.delete_before(cutoff, limit=8) == 4
    assert store.telemetry.delete_before(cutoff, limit=8) == 0
    assert store.telemetry.arrival_order("a") == list(range(20, 25)) and store.telemetry.arrival_order("b") == [1]
    assert store.devices.get("a")["last_telemetry"]["seq"] == 24  # the device keeps its last window
    # what went is kept per hour: three chunks added into one row, sums exact, the worst p95
    (h,) = store.telemetry.hourly("a")
    gone = range(20)
    inputs = sum(10 + i for i in gone)
    assert h["hour_start"] == hour * 3600.0 and h["windows"] == 20 and h["inputs"] == inputs
    assert h["offload_rate"] == pytest.approx(sum((10 + i) * 0.1 * (i % 3) for i in gone) / inputs)
    assert h["edge_p95_max"] == pytest.approx(19 / 1000) and h["drift_windows"] == 5
    assert store.telemetry.hourly("b") == []
    assert store.telemetry.delete_before(hour * 3600.0 + 7200, limit=100) == 6
    assert store.telemetry.hourly("a")[0]["windows"] == 25
    (hb,) = store.telemetry.hourly("b")
    assert hb["hour_start"] == (hour + 1) * 3600.0 and hb["offload_rate"] == pytest.approx(0.5)
    assert hb["edge_p95_max"] is None
