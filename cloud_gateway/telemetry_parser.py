"""Strict parsing of what agents publish: telemetry windows (``<prefix>/<id>/telemetry``) and statuses
(``<prefix>/<id>/status``).

A window is checked field by field on arrival, before anything is stored:
the gateway's API and dashboard later read these fields as numbers, so a
string in ``offload_rate`` or a NaN in a latency would break them for every
reader of the fleet. A window that fails is refused whole (`TelemetryError`,
counted by the worker), never stored in part.

Known fields are typed; unknown top-level fields (a newer agent's additions)
are kept but must be plain JSON: finite numbers, bounded strings, bounded
nesting. The format is documented in docs/wire.md.

A status is held to the same rules (`parse_status`), and to a size of its own: it is retained, stored and
served on every dashboard poll, so a 3 MiB one would be re-sent to every reader, and a NaN in it made
``/api/devices`` invalid JSON, blanking the dashboard for the whole fleet. Its strings are cut to
`MAX_STRING` characters rather than refused (an error message a device reports is still worth showing).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from edgecore import wire

MAX_WINDOW_BYTES = 64 << 10
MAX_DEPTH = 6
MAX_STRING = 1024
_LAT_STATS = ("mean", "p50", "p95", "p99")


class TelemetryError(wire.WireError):
    """A telemetry window that is refused (the message names the field)."""


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num(path: str, v: Any, *, lo: float | None = None, hi: float | None = None, null: bool = False) -> None:
    if v is None and null:
        return
    if not _is_num(v):
        raise TelemetryError(f"{path}: expected a finite number, got {_show(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise TelemetryError(f"{path}: {v} is outside [{lo}, {hi}]")


def _int(path: str, v: Any, *, lo: int = 0) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v < 2**63:
        raise TelemetryError(f"{path}: expected an integer >= {lo}, got {_show(v)}")


def _str(path: str, v: Any, *, null: bool = False) -> None:
    if v is None and null:
        return
    if not isinstance(v, str) or len(v) > MAX_STRING:
        raise TelemetryError(f"{path}: expected a string (at most {MAX_STRING} characters), got {_show(v)}")


def _obj(path: str, v: Any, *, null: bool = False) -> dict[str, Any] | None:
    if v is None and null:
        return None
    if not isinstance(v, dict):
        raise TelemetryError(f"{path}: expected an object, got {_show(v)}")
    return v


def _show(v: Any) -> str:
    r = repr(v)
    return f"{type(v).__name__} {r[:40]}{'…' if len(r) > 40 else ''}"


def _plain(path: str, v: Any, depth: int = 0) -> None:
    """Any JSON value with finite numbers, bounded strings and bounded nesting."""
    if depth > MAX_DEPTH:
        raise TelemetryError(f"{path}: nested deeper than {MAX_DEPTH}")
    if isinstance(v, dict):
        for k, x in v.items():
            _plain(f"{path}.{k}", x, depth + 1)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _plain(f"{path}[{i}]", x, depth + 1)
    elif isinstance(v, float) and not math.isfinite(v):
        raise TelemetryError(f"{path}: non-finite number {v}")
    elif isinstance(v, str) and len(v) > MAX_STRING:
        raise TelemetryError(f"{path}: string longer than {MAX_STRING} characters")


def _latency(path: str, v: Any) -> None:
    for key, h in (_obj(path, v) or {}).items():
        h = _obj(f"{path}.{key}", h) or {}
        _int(f"{path}.{key}.count", h.get("count"))
        for s in _LAT_STATS:
            _num(f"{path}.{key}.{s}", h.get(s), lo=0, null=True)


def _drift(path: str, v: Any) -> None:
    d = _obj(path, v, null=True)
    if d is None:
        return
    if "flag" in d and not isinstance(d["flag"], bool):
        raise TelemetryError(f"{path}.flag: expected true or false, got {_show(d['flag'])}")
    if "n" in d:
        _int(f"{path}.n", d["n"])
    for name, stat in d.items():
        if name in ("flag", "n"):
            continue
        for k, x in (_obj(f"{path}.{name}", stat) or {}).items():
            _num(f"{path}.{name}.{k}", x, null=True)


def _counts(path: str, v: Any) -> None:
    for k, x in (_obj(path, v) or {}).items():
        _int(f"{path}.{k}", x)


def _model(path: str, v: Any) -> None:
    m = _obj(path, v, null=True) or {}
    for k in ("name", "version"):
        _str(f"{path}.{k}", m.get(k), null=True)


def _outbox(path: str, v: Any) -> None:
    o = _obj(path, v, null=True) or {}
    for k in ("dropped", "queued"):
        if k in o:
            _int(f"{path}.{k}", o[k])


_FIELDS: dict[str, Callable[[str, Any], None]] = {
    "t_start": lambda p, v: _num(p, v, lo=0, null=True),
    "t_end": lambda p, v: _num(p, v, lo=0, null=True),
    "offload_rate": lambda p, v: _num(p, v, lo=0, hi=1),
    "fallback_rate": lambda p, v: _num(p, v, lo=0, hi=1),
    "threshold": lambda p, v: _num(p, v, null=True),
    "bundle_sha256": lambda p, v: _str(p, v, null=True),
    "boot": lambda p, v: _str(p, v, null=True),  # the agent's per-state-dir id, part of the window's identity
    "counts": _counts,
    "latency": _latency,
    "drift": _drift,
    "model": _model,
    "outbox": _outbox,
}


def parse_window(payload: bytes, device_id: str) -> dict[str, Any]:
    """The window as a dict, every known field type-checked; raises `TelemetryError` naming the field."""
    if len(payload) > MAX_WINDOW_BYTES:
        raise TelemetryError(f"telemetry window of {len(payload)} bytes exceeds {MAX_WINDOW_BYTES}")
    msg = wire.loads(payload)
    if msg.get("device_id") != device_id:
        raise TelemetryError(f"device_id {_show(msg.get('device_id'))} does not match the topic's {device_id!r}")
    _int("seq", msg.get("seq"))
    for key, check in _FIELDS.items():
        if key in msg:
            check(key, msg[key])
    _plain("window", msg)
    return msg


MAX_STATUS_BYTES = 16 << 10


class StatusError(wire.WireError):
    """A device status that is refused (the message names the field)."""


def _cut(v: Any, path: str = "status", depth: int = 0) -> Any:
    """``v`` with strings cut to `MAX_STRING` characters; non-finite numbers and deep nesting refused."""
    if depth > MAX_DEPTH:
        raise StatusError(f"{path}: nested deeper than {MAX_DEPTH}")
    if isinstance(v, dict):
        return {str(k)[:MAX_STRING]: _cut(x, f"{path}.{k}", depth + 1) for k, x in v.items()}
    if isinstance(v, list):
        return [_cut(x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v)]
    if isinstance(v, float) and not math.isfinite(v):
        raise StatusError(f"{path}: non-finite number {v}")
    if isinstance(v, str) and len(v) > MAX_STRING:
        return v[: MAX_STRING - 1] + "…"
    return v


_STATUS_STRINGS = ("state", "broker", "bundle_sha256", "model", "version", "target", "precision", "telemetry")


def parse_status(payload: bytes, device_id: str) -> dict[str, Any]:
    """A device's status as a dict, checked (`StatusError` naming the field) and with long strings cut."""
    if len(payload) > MAX_STATUS_BYTES:
        raise StatusError(f"status of {len(payload)} bytes exceeds {MAX_STATUS_BYTES}")
    try:
        msg = _cut(wire.loads(payload))
    except RecursionError as e:
        raise StatusError("status: nested too deep") from e
    try:
        if msg.get("device_id", device_id) != device_id:
            raise TelemetryError(f"device_id {_show(msg.get('device_id'))} does not match the topic's {device_id!r}")
        for key in _STATUS_STRINGS:
            _str(key, msg.get(key), null=True)
        _num("time", msg.get("time"), lo=0, null=True)
        _num("threshold", msg.get("threshold"), null=True)
        cmd = _obj("last_cmd", msg.get("last_cmd"), null=True)
        if cmd is not None:
            _str("last_cmd.cmd", cmd.get("cmd"), null=True)
            _str("last_cmd.error", cmd.get("error"), null=True)
            if "ok" in cmd and not isinstance(cmd["ok"], bool):
                raise TelemetryError(f"last_cmd.ok: expected true or false, got {_show(cmd['ok'])}")
        inputs = _obj("inputs", msg.get("inputs"), null=True)
        for k, x in (inputs or {}).items():
            _int(f"inputs.{k}", x)
    except TelemetryError as e:
        raise StatusError(str(e)) from e
    return msg
