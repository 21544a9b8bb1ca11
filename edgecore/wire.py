"""Compact binary tensors and the JSON messages on the MQTT topics.

Why not JSON lists: a float32 8x8 digit is 256 bytes raw and ~1.3 kB as JSON
text, and parsing is slower. A tensor is a 8-byte header (magic ``ET``,
version, dtype code, ndim) followed by ``ndim`` little-endian uint32 dims and
the raw little-endian bytes. Every JSON message carries ``"schema": 1``.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

MAGIC = b"ET"
WIRE_VERSION = 1
MESSAGE_SCHEMA = 1
MAX_NDIM = 8
_DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f2"),
    3: np.dtype("u1"),
    4: np.dtype("i1"),
    5: np.dtype("<i4"),
    6: np.dtype("<i8"),
    7: np.dtype("<f8"),
}
_CODES = {v: k for k, v in _DTYPES.items()}
_HEADER = struct.Struct("<2sBBBxxx")


class WireError(ValueError):
    """A payload that is not a valid tensor or message (the gateway answers with it)."""


def encode_tensor(x: np.ndarray) -> bytes:
    a = np.asarray(x)  # not ascontiguousarray: it turns a 0-d array into shape (1,); tobytes() is C order anyway
    code = next((c for c, d in _DTYPES.items() if d.kind == a.dtype.kind and d.itemsize == a.dtype.itemsize), None)
    if code is None:
        raise WireError(f"dtype {a.dtype} cannot be sent (supported: {[str(d) for d in _DTYPES.values()]})")
    if a.ndim > MAX_NDIM:
        raise WireError(f"{a.ndim} dimensions (max {MAX_NDIM})")
    a = a.astype(_DTYPES[code], copy=False)
    return _HEADER.pack(MAGIC, WIRE_VERSION, code, a.ndim) + struct.pack(f"<{a.ndim}I", *a.shape) + a.tobytes()


def decode_tensor(payload: bytes, *, max_bytes: int | None = None) -> np.ndarray:
    """Parse a tensor payload; every way it can be wrong raises `WireError` naming it."""
    if max_bytes is not None and len(payload) > max_bytes:
        raise WireError(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    if len(payload) < _HEADER.size:
        raise WireError(f"payload of {len(payload)} bytes is shorter than the tensor header")
    magic, version, code, ndim = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise WireError("not a tensor payload (bad magic)")
    if version != WIRE_VERSION:
        raise WireError(f"unknown tensor wire version {version}")
    if code not in _DTYPES:
        raise WireError(f"unknown dtype code {code}")
    if ndim > MAX_NDIM:
        raise WireError(f"{ndim} dimensions (max {MAX_NDIM})")
    off = _HEADER.size + 4 * ndim
    if len(payload) < off:
        raise WireError("truncated tensor header")
    shape = struct.unpack_from(f"<{ndim}I", payload, _HEADER.size)
    dt = _DTYPES[code]
    # Python ints: no int64 overflow (np.prod wraps silently). numpy also refuses a shape whose non-zero dims
    # overflow, even when another dim is 0 and the array is empty.
    if math.prod(max(d, 1) for d in shape) * dt.itemsize >= 2**63:
        raise WireError(f"shape {list(shape)} {dt} is too large (over 2^63 bytes)")
    expected = math.prod(shape) * dt.itemsize
    if len(payload) - off != expected:
        raise WireError(f"tensor body is {len(payload) - off} bytes, shape {list(shape)} {dt} needs {expected}")
    return np.frombuffer(payload, dtype=dt, offset=off).reshape(shape)


_ENV = struct.Struct("<2sBH")
ENVELOPE_VERSION = 1


class EnvelopeError(WireError):
    """A request envelope the gateway cannot serve; carries whatever reply address it could read.

    Every envelope version keeps the same prefix (``EV``, version, correlation,
    response topic), so a gateway can answer even a version it does not know.
    """

    def __init__(self, message: str, *, correlation: bytes | None = None, response_topic: str | None = None):
        super().__init__(message)
        self.correlation = correlation
        self.response_topic = response_topic


def encode_request(tensor: bytes, *, correlation: bytes, response_topic: str,
                   version: int = ENVELOPE_VERSION) -> bytes:
    """A request envelope for MQTT 3.1.1 brokers, which lack MQTT 5's properties.

    ``EV``, version (u8), correlation length (u16 LE) and bytes, response topic
    length (u16 LE) and UTF-8 bytes, then the tensor payload. With MQTT 5 the
    properties carry these instead. See docs/wire.md.
    """
    rt = response_topic.encode()
    if len(correlation) > 0xFFFF or len(rt) > 0xFFFF:
        raise WireError("correlation data and response topic must each be under 64 KiB")
    return _ENV.pack(b"EV", version, len(correlation)) + correlation + struct.pack("<H", len(rt)) + rt + tensor


def _envelope_prefix(payload: bytes) -> tuple[int, bytes | None, str | None, int]:
    """(version, correlation, response topic, offset of the body); None where truncated or unreadable."""
    if len(payload) < _ENV.size:
        return (payload[2] if len(payload) > 2 else -1), None, None, len(payload)
    _, version, n = _ENV.unpack_from(payload)
    off = _ENV.size + n
    if len(payload) < off:
        return version, None, None, len(payload)
    corr = payload[_ENV.size:off]
    if len(payload) < off + 2:
        return version, corr, None, len(payload)
    (m,) = struct.unpack_from("<H", payload, off)
    raw = payload[off + 2:off + 2 + m]
    try:
        rt = raw.decode() if len(raw) == m else None
    except UnicodeDecodeError:
        rt = None
    return version, corr, rt, off + 2 + m


def decode_request(payload: bytes) -> tuple[bytes | None, str | None, bytes]:
    """``(correlation, response_topic, tensor payload)``; (None, None, payload) for a bare tensor.

    A malformed envelope raises `EnvelopeError` with the reply address it could
    still read, so the sender gets an error reply instead of silence.
    """
    if payload[:2] != b"EV":
        return None, None, payload
    version, corr, rt, off = _envelope_prefix(payload)
    if rt is None:
        raise EnvelopeError("truncated or unreadable request envelope", correlation=corr)
    if version != ENVELOPE_VERSION:
        raise EnvelopeError(f"unknown request envelope version {version} (this gateway speaks {ENVELOPE_VERSION})",
                            correlation=corr, response_topic=rt)
    return corr, rt, payload[off:]


_ENCODER = json.JSONEncoder(separators=(",", ":"))  # one encoder: json.dumps with options builds one per call


def dumps(msg: dict[str, Any]) -> bytes:
    return _ENCODER.encode({"schema": MESSAGE_SCHEMA, **msg}).encode()


def loads(payload: bytes) -> dict[str, Any]:
    """Parse a JSON message with a known schema, or raise `WireError`."""
    try:
        msg = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"not a JSON message ({e})") from e
    if not isinstance(msg, dict):
        raise WireError("message is not a JSON object")
    if msg.get("schema") != MESSAGE_SCHEMA:
        raise WireError(f"unknown message schema {msg.get('schema')!r} (expected {MESSAGE_SCHEMA})")
    return msg


#: the topic prefix every side uses unless told otherwise
DEFAULT_PREFIX = "fleet"
#: the shared-subscription group the gateway replicas split requests in
SHARE_GROUP = "gateways"


class Topics:
    """Topic names under a prefix (default ``fleet``) for one device, and the fleet-wide patterns.

    The one home of the topic scheme: ``<prefix>/<device>/<suffix>``. Devices use
    the instance attributes; the gateway and operators subscribe to `pattern`.
    """

    REQ, RESP, TELEMETRY, STATUS, CMD, BENCH, ANSWERS, INPUT, TELEMETRY_ACK = (
        "infer/req", "infer/resp", "telemetry", "status", "cmd", "bench", "answers", "input", "telemetry/ack")

    def __init__(self, device_id: str, prefix: str = DEFAULT_PREFIX) -> None:
        self.device_id = device_id
        self.prefix = prefix
        self.req = self.of(prefix, device_id, self.REQ)
        self.resp = self.of(prefix, device_id, self.RESP)
        self.telemetry = self.of(prefix, device_id, self.TELEMETRY)
        self.status = self.of(prefix, device_id, self.STATUS)
        self.cmd = self.of(prefix, device_id, self.CMD)
        self.bench = self.of(prefix, device_id, self.BENCH)
        self.answers = self.of(prefix, device_id, self.ANSWERS)
        self.input = self.of(prefix, device_id, self.INPUT)
        self.telemetry_ack = self.of(prefix, device_id, self.TELEMETRY_ACK)

    @staticmethod
    def of(prefix: str, device_id: str, suffix: str) -> str:
        """One device's topic, e.g. ``of("fleet", "dev-a", Topics.CMD)`` -> ``fleet/dev-a/cmd``."""
        return f"{prefix}/{device_id}/{suffix}"

    @staticmethod
    def pattern(prefix: str, suffix: str, *, share: str | None = None) -> str:
        """Every device's ``suffix`` topic (``<prefix>/+/<suffix>``), optionally as an MQTT 5 shared subscription."""
        p = f"{prefix}/+/{suffix}"
        return f"$share/{share}/{p}" if share else p

    @classmethod
    def shared_requests(cls, prefix: str = DEFAULT_PREFIX, group: str = SHARE_GROUP) -> str:
        """The filter gateway replicas share requests by: ``$share/<group>/<prefix>/+/infer/req``."""
        return cls.pattern(prefix, cls.REQ, share=group)
