"""Property-based fuzzing of what the gateway parses from the network.

The wire decoder, the request envelope and the telemetry parser either return
a well-formed value or raise `WireError` (which the gateway turns into an
error reply or a refused window); nothing else may escape. The default suite
runs a bounded number of examples; ``-m slow`` runs many more.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_gateway.telemetry_parser import TelemetryError, parse_window
from edgecore import wire

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=20000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_DTYPES = ["<f4", "<f2", "u1", "i1", "<i4", "<i8", "<f8"]


@st.composite
def tensor_payloads(draw):
    """Headers that look right with adversarial dims and body lengths (incl. int64-overflowing shapes)."""
    ndim = draw(st.integers(0, 9))
    dims = draw(st.lists(st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1)), min_size=ndim, max_size=ndim))
    head = struct.pack("<2sBBBxxx", draw(st.sampled_from([b"ET", b"EX"])), draw(st.sampled_from([1, 1, 1, 2])),
                       draw(st.integers(0, 9)), ndim)
    body = draw(st.binary(max_size=256))
    return head + struct.pack(f"<{ndim}I", *dims) + body


def _check_tensor(payload: bytes) -> None:
    try:
        x = wire.decode_tensor(payload, max_bytes=1 << 16)
    except wire.WireError as e:
        assert str(e)
        return
    assert isinstance(x, np.ndarray) and x.nbytes <= len(payload)
    assert wire.encode_tensor(x) == payload  # what decodes re-encodes to the same bytes


def _check_request(payload: bytes) -> None:
    try:
        corr, rt, body = wire.decode_request(payload)
    except wire.EnvelopeError as e:
        assert payload[:2] == b"EV" and str(e)
        assert e.response_topic is None or isinstance(e.response_topic, str)
        return
    if payload[:2] == b"EV":
        assert isinstance(corr, bytes) and isinstance(rt, str)
        assert wire.encode_request(body, correlation=corr, response_topic=rt) == payload
    else:
        assert (corr, rt, body) == (None, None, payload)


@FAST
@given(st.one_of(st.binary(max_size=300), tensor_payloads()))
def test_tensor_decoder_never_fails_uncontrolled(payload):
    _check_tensor(payload)


def test_shape_overflowing_int64_is_refused_by_name():
    # 2^32-1 ^ 3 elements * 4 bytes overflows int64; np.prod used to wrap and could match a short body
    payload = struct.pack("<2sBBBxxx", b"ET", 1, 1, 3) + struct.pack("<3I", *(2**32 - 1,) * 3) + b"\0" * 16
    with pytest.raises(wire.WireError, match="too large"):
        wire.decode_tensor(payload)
    wrap = struct.pack("<2sBBBxxx", b"ET", 1, 6, 4) + struct.pack("<4I", 2**16, 2**16, 2**16, 2**16)
    with pytest.raises(wire.WireError, match="too large"):  # 2^64 elements * 8 bytes wraps to 0 in int64
        wire.decode_tensor(wrap)
    empty = struct.pack("<2sBBBxxx", b"ET", 1, 1, 2) + struct.pack("<2I", 0, 2**32 - 1)  # 0 elements, but numpy
    assert wire.decode_tensor(empty).shape == (0, 2**32 - 1)  # can hold it: fine


@FAST
@given(st.sampled_from(_DTYPES), st.lists(st.integers(0, 3), max_size=4), st.data())
def test_tensor_round_trip(dtype, shape, data):
    n = math.prod(shape)
    raw = data.draw(st.binary(min_size=n * np.dtype(dtype).itemsize, max_size=n * np.dtype(dtype).itemsize))
    x = np.frombuffer(raw, dtype=dtype).reshape(shape)
    y = wire.decode_tensor(wire.encode_tensor(x))
    assert y.dtype == x.dtype and y.shape == x.shape and y.tobytes() == x.tobytes()


@st.composite
def envelopes(draw):
    corr = draw(st.binary(max_size=40))
    rt = draw(st.text(max_size=40))
    version = draw(st.sampled_from([1, 1, 0, 2, 255]))
    full = wire.encode_request(draw(st.binary(max_size=40)), correlation=corr, response_topic=rt, version=version)
    cut = draw(st.integers(0, len(full)))
    return full[:cut] if draw(st.booleans()) else full


@FAST
@given(st.one_of(envelopes(), st.binary(max_size=80).map(lambda b: b"EV" + b)))
def test_request_envelope_decoder_never_fails_uncontrolled(payload):
    _check_request(payload)


def test_unknown_envelope_version_keeps_the_reply_address():
    env = wire.encode_request(b"T", correlation=b"c1", response_topic="fleet/d/infer/resp", version=2)
    with pytest.raises(wire.EnvelopeError, match="unknown request envelope version 2") as e:
        wire.decode_request(env)
    assert (e.value.correlation, e.value.response_topic) == (b"c1", "fleet/d/infer/resp")


def good_window(device_id: str = "dev-a", seq: int = 3) -> dict:
    lat = {"count": 5, "mean": 0.001, "p50": 0.001, "p95": 0.002, "p99": 0.002}
    return {"schema": 1, "device_id": device_id, "seq": seq, "t_start": 1.7e9, "t_end": 1.7e9 + 10,
            "counts": {"inputs": 5, "cloud": 1, "fallback": 0}, "offload_rate": 0.2, "fallback_rate": 0.0,
            "latency": {"edge": lat, "cloud_rtt": {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None}},
            "drift": {"n": 5, "confidence": {"psi": 0.1, "ks_d": 0.2, "ks_p": 0.5}, "flag": False},
            "threshold": 0.6, "bundle_sha256": "ab" * 32, "model": {"name": "m", "version": "1"},
            "outbox": {"dropped": 0, "queued": 0}}


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_paths = st.sampled_from([("seq",), ("device_id",), ("offload_rate",), ("fallback_rate",), ("t_end",),
                          ("threshold",), ("counts", "inputs"), ("latency", "edge", "p50"), ("latency", "edge"),
                          ("latency", "cloud_rtt", "count"), ("drift",), ("drift", "flag"),
                          ("drift", "confidence", "psi"), ("model", "version"), ("outbox", "dropped"),
                          ("extra",), ("latency",), ("counts",)])


def _check_window(raw: bytes) -> None:
    try:
        msg = parse_window(raw, "dev-a")
    except TelemetryError as e:
        assert str(e)
        return
    except wire.WireError as e:  # not JSON, not an object, wrong schema
        assert str(e)
        return
    # accepted: strictly serialisable (no NaN/Infinity for the API's readers) and numeric where read as numbers
    json.dumps(msg, allow_nan=False)
    assert isinstance(msg["seq"], int) and not isinstance(msg["seq"], bool)
    for key in ("offload_rate", "fallback_rate"):
        assert key not in msg or (isinstance(msg[key], (int, float)) and 0 <= msg[key] <= 1)
    for h in (msg.get("latency") or {}).values():
        assert all(h.get(s) is None or isinstance(h[s], (int, float)) for s in ("p50", "p95", "p99", "mean"))


@FAST
@given(_paths, _json_values)
def test_telemetry_parser_types_every_field(path, value):
    w = good_window()
    node = w
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    _check_window(json.dumps(w).encode())


@FAST
@given(st.one_of(st.binary(max_size=200), _json_values.map(lambda v: json.dumps(v).encode())))
def test_telemetry_parser_on_garbage(raw):
    _check_window(raw)


def test_telemetry_parser_messages_name_the_field():
    assert parse_window(json.dumps(good_window()).encode(), "dev-a")["seq"] == 3
    for path, value, needle in [(("offload_rate",), "0.5", "offload_rate"), (("seq",), "7", "seq"),
                                (("latency", "edge", "p50"), "fast", "latency.edge.p50"),
                                (("counts", "inputs"), -1, "counts.inputs"), (("seq",), True, "seq")]:
        w = good_window()
        node = w
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        with pytest.raises(TelemetryError, match=needle.replace(".", r"\.")):
            parse_window(json.dumps(w).encode(), "dev-a")
    with pytest.raises(TelemetryError, match="non-finite"):
        parse_window(json.dumps({**good_window(), "extra": [float("nan")]}).encode(), "dev-a")
    with pytest.raises(TelemetryError, match="does not match"):
        parse_window(json.dumps(good_window("dev-b")).encode(), "dev-a")


@pytest.mark.slow
@LONG
@given(st.one_of(st.binary(max_size=300), tensor_payloads(), envelopes()), _paths, _json_values)
def test_long_fuzz_run(payload, path, value):
    _check_tensor(payload)
    _check_request(payload)
    test_telemetry_parser_types_every_field.hypothesis.inner_test(path, value)
