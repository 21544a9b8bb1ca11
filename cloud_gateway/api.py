"""Flask HTTP API: health, Prometheus metrics, devices, bundles, commands, dashboard.

Reads are open (devices fetch bundles without credentials; the agent checks
every hash anyway); writes (bundle upload, device commands) need the
gateway's token as ``Authorization: Bearer <token>``.

Every error is a JSON body ``{"ok": false, "error": "..."}`` with
``application/json``: never the request echoed back as HTML, never a server
path. The dashboard is served with a Content-Security-Policy that allows only
its own script, stylesheet and API.
"""

from __future__ import annotations

import hmac
import logging
import math
import re
import shutil
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from flask import Flask, Response, abort, jsonify, request, send_file
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

from edgecore.bundle import TrustPolicy, sha256_file
from edgecore.errors import BundleTrustError, GatewayError

from .config import DEFAULT_PROMOTE_IF
from .metrics import Metrics
from .store import GatewayStore

log = logging.getLogger(__name__)

DASHBOARD_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
                 "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
API_CSP = "default-src 'none'; frame-ancestors 'none'"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
MAX_BUNDLE_BYTES = 512 << 20
MAX_ID = (1 << 63) - 1  # the store's integer ids are signed 64-bit


BODY_GATE = "cloud_gateway.body_gate"


def token_refusal(token: str | None, authorization: str) -> tuple[int, str] | None:
    """Why a write with this ``Authorization`` header is refused ((status, message)), or None when allowed."""
    if not token:
        return 403, "write endpoints are disabled: start the gateway with --token"
    if not hmac.compare_digest(authorization.encode(), f"Bearer {token}".encode()):
        return 401, "missing or wrong token"
    return None


def _static(name: str) -> str:
    return resources.files("cloud_gateway").joinpath("static", name).read_text()


def _device_view(row: dict[str, Any]) -> dict[str, Any]:
    tel = row.get("last_telemetry") or {}
    drift = tel.get("drift") or {}
    status = row.get("status") or {}
    return {
        "device_id": row["device_id"],
        "state": status.get("state", "unknown"),
        "model_line": row.get("model_line"),
        "version": row.get("version"),
        "status": status,
        "last_seen": row.get("last_seen"),
        "offload_rate": tel.get("offload_rate"),
        "fallback_rate": tel.get("fallback_rate"),
        "latency": tel.get("latency"),
        "drift_flag": bool(drift.get("flag")),
        "drift": drift or None,
        "bundle_sha256": tel.get("bundle_sha256") or status.get("bundle_sha256"),
        "last_telemetry": tel or None,
    }


MAX_DEVICE_PAGE = 500


def _device_query() -> Any:
    """``?limit=&cursor=&sort=&state=&drifting=&line=&bundle=&q=`` as a `DeviceQuery`; a bad one is a 400."""
    from .store.devices import SORTS, STATES, DeviceQuery, read_cursor

    a = request.args
    state = a.get("state") or None
    if state is not None and state not in STATES:
        _fail(400, f"state: one of {', '.join(STATES)}, got {state[:40]!r}")
    drifting = a.get("drifting")
    if drifting not in (None, "", "1", "0", "true", "false"):
        _fail(400, f"drifting: 1 or 0, got {drifting[:40]!r}")
    sort = a.get("sort") or "device_id"
    if sort.lstrip("-") not in SORTS:
        _fail(400, f"sort: one of {', '.join(SORTS)} (prefix - for descending), got {sort[:40]!r}")
    cursor = a.get("cursor") or None
    if cursor is not None:
        try:
            read_cursor(cursor)
        except ValueError as e:
            _fail(400, str(e))
    return DeviceQuery(limit=_int_arg("limit", 50, 1, MAX_DEVICE_PAGE), sort=sort, cursor=cursor, state=state,
                       drifting=None if drifting in (None, "") else drifting in ("1", "true"),
                       line=a.get("line") or None, bundle=a.get("bundle") or None, q=a.get("q") or None)


def _device_page(store: GatewayStore) -> dict[str, Any]:
    q = _device_query()
    rows, nxt, total = store.devices.page(q)
    return {"devices": [_device_view(r) for r in rows], "next_cursor": nxt, "total": total, "limit": q.limit,
            "sort": q.sort}


class FleetSummary:
    """The store's fleet summary, computed at most once per ``ttl_s``: every open dashboard and every scrape of
    /metrics read the same one (at 5,000 devices a summary is a few aggregate scans of the devices table)."""

    def __init__(self, store: GatewayStore, ttl_s: float = 1.0) -> None:
        self.store, self.ttl_s = store, ttl_s
        self._lock = threading.Lock()
        self._at: float = -1e9
        self._value: dict[str, Any] | None = None

    def get(self) -> dict[str, Any]:
        with self._lock:  # one computes, the others wait for it and share it
            now = time.monotonic()
            if self._value is None or now - self._at >= self.ttl_s:
                self._value, self._at = self.store.devices.summary(), now
            return dict(self._value)


def fleet_gauges(summary: dict[str, Any]) -> str:
    """The fleet's gauges in Prometheus text, per model line and bundle version, from the fleet summary."""
    s = summary
    out = ["# HELP fleet_devices Devices by state (their last status)", "# TYPE fleet_devices gauge"]
    rates = ["# HELP fleet_offload_rate Offload rate of the devices' last windows, weighted by inputs",
             "# TYPE fleet_offload_rate gauge",
             "# HELP fleet_fallback_rate Fallback rate of the devices' last windows, weighted by inputs",
             "# TYPE fleet_fallback_rate gauge",
             "# HELP fleet_drifting_devices Devices whose last window flagged drift", "# TYPE fleet_drifting_devices gauge"]
    from .metrics import _fmt_labels

    for g in s["groups"]:
        labels = (("line", g["model_line"] or "unknown"), ("version", g["version"] or "unknown"))
        for state in ("online", "offline", "unknown"):
            out.append(f"fleet_devices{_fmt_labels(labels, [('state', state)])} {g[state]}")
        rates.append(f"fleet_drifting_devices{_fmt_labels(labels)} {g['drifting']}")
        for k in ("offload_rate", "fallback_rate"):
            if g[k] is not None and math.isfinite(g[k]):
                rates.append(f"fleet_{k}{_fmt_labels(labels)} {g[k]:.6g}")
    return "\n".join(out + rates) + "\n"


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by None: JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


class FiniteJSONProvider(DefaultJSONProvider):
    """Every JSON the API sends is valid JSON: a non-finite number (a NaN stored before statuses were
    checked, or computed from one) is sent as null, never as ``NaN``, which browsers refuse to parse; one bad
    row blanked the dashboard for the whole fleet."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        kwargs["allow_nan"] = False
        try:
            return super().dumps(obj, **kwargs)
        except ValueError:  # (rare: only then is the whole value walked)
            return super().dumps(finite(obj), **kwargs)


def _fail(code: int, message: str) -> None:
    abort(code, description=message)


def _scrub(message: str, *paths: Path) -> str:
    """The message without server paths (a client learns nothing about the gateway's disk)."""
    for p in sorted({str(p) for p in paths}, key=len, reverse=True):
        message = message.replace(p + "/", "").replace(p, "")
    return message


def _install_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> Response:
        custom = e.description if e.description != type(e).description else None
        resp = jsonify({"ok": False, "error": custom or (e.name or "error").lower()})
        resp.status_code = e.code or 500
        for k, v in e.get_headers():
            if k.lower() != "content-type":
                resp.headers[k] = v
        return resp

    @app.errorhandler(Exception)
    def internal_error(e: Exception) -> Response:
        log.exception("HTTP handler failed")
        resp = jsonify({"ok": False, "error": "internal error (see the gateway log)"})
        resp.status_code = 500
        return resp

    @app.after_request
    def security_headers(resp: Response) -> Response:
        resp.headers.setdefault("Content-Security-Policy", API_CSP)
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        return resp


def create_app(
    *,
    store: GatewayStore,
    metrics: Metrics,
    bundles_dir: Path,
    token: str | None,
    send_command: Callable[[str, dict[str, Any]], Any] | None = None,
    health: Callable[[], dict[str, Any]] | None = None,
    trust: TrustPolicy = TrustPolicy(),
    collect: Any = None,
    num_classes: int | None = None,
    rollouts: Any = None,
    policy: Any = None,
) -> Flask:
    app = Flask("cloud_gateway")
    app.json = FiniteJSONProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BUNDLE_BYTES
    _install_handlers(app)
    # absolute at start-up: Flask resolves a relative send_file path against the package, not the cwd
    bundles_dir = Path(bundles_dir).resolve()
    bundles_dir.mkdir(parents=True, exist_ok=True)

    def require_token() -> None:
        refused = token_refusal(token, request.headers.get("Authorization", ""))
        if refused is not None:
            _fail(*refused)

    # the HTTP server asks this from the headers alone, before it reads a body (service.HttpServer)
    app.extensions[BODY_GATE] = lambda authorization: token_refusal(token, authorization)

    @app.url_value_preprocessor
    def ids_fit_the_store(endpoint: str | None, values: dict[str, Any] | None) -> None:
        """An id in a path (sample, rollout, proposal) past the store's 64-bit integers is a 400, not a 500."""
        for k, v in (values or {}).items():
            if isinstance(v, int) and v > MAX_ID:
                _fail(400, f"{k}: {v} is not an id (ids are integers from 0 to {MAX_ID})")

    summary = FleetSummary(store)
    _register_health(app, metrics=metrics, health=health, summary=summary)
    _register_devices(app, store=store, send_command=send_command, require_token=require_token, summary=summary)
    _register_bundles(app, bundles_dir=bundles_dir, trust=trust, require_token=require_token)
    _register_samples(app, store=store, require_token=require_token, collect=collect, num_classes=num_classes)
    _register_rollouts(app, store=store, rollouts=rollouts, require_token=require_token)
    _register_policy(app, store=store, policy=policy, require_token=require_token)
    _register_dashboard(app)
    return app


def _register_health(app: Flask, *, metrics: Metrics, health: Callable[[], dict[str, Any]] | None,
                     summary: FleetSummary) -> None:
    @app.get("/healthz")
    def healthz() -> Any:
        h = {"ok": True, **(health() if health else {})}
        return jsonify(h), (200 if h.get("ok") else 503)

    @app.get("/metrics")
    def prom() -> Response:
        text = metrics.render()
        if not metrics.per_device:  # the fleet per model line; per device, the gauges are the devices' own
            text += fleet_gauges(summary.get())
        return Response(text, mimetype="text/plain; version=0.0.4")


def _register_devices(app: Flask, *, store: GatewayStore, send_command: Callable[[str, dict[str, Any]], Any] | None,
                      require_token: Callable[[], None], summary: FleetSummary) -> None:
    @app.get("/api/devices")
    def list_devices() -> Any:
        """A page of the fleet: ``{devices, next_cursor, total, limit, sort}`` (``?cursor=next_cursor``: the next)."""
        return jsonify(_device_page(store))

    @app.get("/api/fleet/summary")
    def fleet_summary() -> Any:
        return jsonify({**summary.get(), "time": time.time()})

    @app.get("/api/fleet/dashboard")
    def fleet_dashboard() -> Any:
        """What the dashboard shows, in one request: the summary, a page of devices (the same parameters as
        ``/api/devices``) and the last five rollouts with their timelines."""
        recent = store.rollouts.all()[-5:][::-1]
        rollouts = [r for r in (store.rollouts.get(int(x["id"])) for x in recent) if r is not None]
        return jsonify({"summary": summary.get(), "page": _device_page(store), "rollouts": rollouts,
                        "time": time.time()})

    @app.get("/api/devices/<device_id>")
    def one_device(device_id: str) -> Any:
        row = store.devices.get(device_id)
        if row is None:
            _fail(404, "unknown device")
        try:
            limit = min(max(int(request.args.get("history", 200)), 0), 5000)
        except ValueError:
            _fail(400, "history must be an integer (number of windows, at most 5000)")
        hours = _int_arg("hourly", 0, 0, 24 * 366)  # the hourly rows kept of windows past the retention
        extra = {"hourly": store.telemetry.hourly(device_id, limit=hours)} if hours else {}
        return jsonify({**_device_view(row), "history": store.telemetry.history(device_id, limit=limit), **extra})

    @app.post("/api/devices/<device_id>/cmd")
    def command(device_id: str) -> Any:
        require_token()
        if send_command is None:
            _fail(503, "this gateway has no MQTT link")
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or body.get("cmd") not in ("set_threshold", "update_bundle", "bench"):
            _fail(400, "body must be a JSON command (cmd: set_threshold|update_bundle|bench)")
        if not _NAME_RE.match(device_id):
            _fail(400, "bad device id")
        send_command(device_id, body)  # signed with the gateway's command key, and expiring
        return jsonify({"ok": True})


def _register_bundles(app: Flask, *, bundles_dir: Path, trust: TrustPolicy, require_token: Callable[[], None]) -> None:
    @app.get("/api/bundles")
    def list_bundles() -> Any:
        return jsonify([{"name": p.name.removesuffix(".tar.gz"), "sha256": sha256_file(p), "size": p.stat().st_size}
                        for p in sorted(bundles_dir.glob("*.tar.gz"))])

    @app.get("/api/bundles/<name>")
    def get_bundle(name: str) -> Any:
        name = name.removesuffix(".tar.gz")
        p = bundles_dir / f"{name}.tar.gz"
        if not _NAME_RE.match(name) or not p.is_file():
            _fail(404, "no such bundle")
        return send_file(p, mimetype="application/gzip", download_name=p.name)

    @app.put("/api/bundles/<name>")
    @app.post("/api/bundles/<name>")
    def put_bundle(name: str) -> Any:
        require_token()
        name = name.removesuffix(".tar.gz")
        if not _NAME_RE.match(name):
            _fail(400, "bundle name: 1-100 characters from A-Z a-z 0-9 _ . -")
        return _store_upload(bundles_dir, trust, name)


MAX_SAMPLES_PAGE = 500


def _int_arg(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        _fail(400, f"{name}: expected an integer, got {raw!r}")
    return min(max(v, lo), hi)


def _register_samples(app: Flask, *, store: GatewayStore, require_token: Callable[[], None], collect: Any,
                      num_classes: int | None) -> None:
    """Collected samples (user data: every route needs the token), the labelling queue, deletion per device."""
    from edgecore.samples import Sample, SamplePage

    def page(rows: list[dict[str, Any]], limit: int) -> Any:
        items = [Sample.from_row(r) for r in rows]
        nxt = items[-1].id if len(items) == limit else None
        return jsonify(SamplePage(items, nxt).to_json())

    @app.get("/api/samples")
    def list_samples() -> Any:
        require_token()
        limit = _int_arg("limit", 100, 1, MAX_SAMPLES_PAGE)
        return page(store.samples.rows(after=_int_arg("after", 0, 0, 1 << 62), limit=limit,
                                      device=request.args.get("device") or None), limit)

    @app.delete("/api/samples")
    def delete_samples() -> Any:
        require_token()
        device = request.args.get("device")
        if not device:
            _fail(400, "give ?device=ID: samples are deleted per device")
        return jsonify({"device": device, "deleted": store.samples.delete(device)})

    @app.get("/api/samples/stats")
    def sample_stats() -> Any:
        require_token()
        return jsonify({"collection": collect.to_dict() if collect is not None else None,
                        "devices": store.samples.stats()})

    @app.get("/api/labels/queue")
    def label_queue() -> Any:
        require_token()
        limit = _int_arg("limit", 50, 1, MAX_SAMPLES_PAGE)
        try:
            least = float(request.args.get("min_uncertainty", "0.3"))
        except ValueError:
            _fail(400, "min_uncertainty: expected a number")
        return jsonify(SamplePage([Sample.from_row(r) for r in store.samples.rows(limit=limit, queue=least)],
                                  None).to_json())

    @app.post("/api/samples/<int:sample_id>/label")
    def label_sample(sample_id: int) -> Any:
        """``{"label": K}`` for a class; for a sample whose teacher answer is detections, ``{"accept": [i, ...]}``:
        the indices of the teacher's boxes the person keeps (the others are rejected; ``[]``: nothing there)."""
        require_token()
        body = request.get_json(silent=True)
        if isinstance(body, dict) and "accept" in body:
            return _accept_boxes(sample_id, body["accept"])
        label = body.get("label") if isinstance(body, dict) else None
        if isinstance(label, bool) or not isinstance(label, int) or label < 0 or (
                num_classes is not None and label >= num_classes):
            _fail(400, f"label: expected a class index 0..{(num_classes or 1) - 1}, got {label!r}")
        row = store.samples.get(sample_id)
        if row is not None and bytes(row["teacher_probs"])[:1] == b"{":  # an answer that is not a class
            _fail(400, f"sample {sample_id}: its teacher answer is detections: give {{\"accept\": [box indices]}}")
        if not store.samples.label(sample_id, label):
            _fail(404, f"no sample {sample_id}")
        return jsonify({"id": sample_id, "human_label": label})

    def _accept_boxes(sample_id: int, accept: Any) -> Any:
        row = store.samples.get(sample_id)
        if row is None:
            _fail(404, f"no sample {sample_id}")
        sample = Sample.from_row(row)
        dets = (sample.teacher_answer or {}).get("detections")
        if not isinstance(dets, list):
            _fail(400, f"sample {sample_id}: its teacher answer is not detections: label it with {{\"label\": K}}")
        if (not isinstance(accept, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in accept)
                or len(set(accept)) != len(accept) or any(not 0 <= i < len(dets) for i in accept)):
            _fail(400, f"accept: expected distinct indices of the teacher's {len(dets)} boxes (0..{len(dets) - 1}), "
                       f"got {str(accept)[:200]}")
        answer = {"detections": [dets[i] for i in sorted(accept)], "accepted": sorted(accept),
                  "rejected": [i for i in range(len(dets)) if i not in set(accept)]}
        store.samples.label_answer(sample_id, answer)
        return jsonify({"id": sample_id, "human_answer": answer})


def _register_rollouts(app: Flask, *, store: GatewayStore, rollouts: Any,
                       require_token: Callable[[], None]) -> None:
    """Staged rollouts (cloud_gateway/rollout.py): start, list, one with its timeline and device versions, abort."""

    @app.post("/api/rollouts")
    def start_rollout() -> Any:
        require_token()
        if rollouts is None:
            _fail(503, "this gateway runs no rollouts")
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("bundle"), str):
            _fail(400, "body: {bundle, canary (ids or 'N%'), watch_s, promote_if, line, canary_seed, min_reports "
                       "(the last three optional)}")
        watch = body.get("watch_s", 60)
        canary = body.get("canary")
        if isinstance(watch, bool) or not isinstance(watch, (int, float)) or not isinstance(canary, (str, list)):
            _fail(400, "watch_s must be a number and canary device ids or a percentage")
        line = body.get("line")
        if line is not None and (not isinstance(line, str) or not line):
            _fail(400, "line must be a model line's name (a cross-line switch: that line's devices move to the bundle)")
        extra = {}
        for key in ("canary_seed", "min_reports"):
            v = body.get(key)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < (1 << 63):
                    _fail(400, f"{key}: expected a non-negative integer, got {str(v)[:40]}")
                extra[key] = v
        try:
            rid = rollouts.start(bundle=body["bundle"], canary=canary, watch_s=float(watch),
                                 promote_if=str(body.get("promote_if") or DEFAULT_PROMOTE_IF), line=line, **extra)
        except GatewayError as e:
            _fail(400, str(e))
        return jsonify({"id": rid, "url": f"/api/rollouts/{rid}"}), 201

    @app.get("/api/rollouts")
    def list_rollouts() -> Any:
        return jsonify(store.rollouts.all())

    @app.get("/api/rollouts/<int:rollout_id>")
    def one_rollout(rollout_id: int) -> Any:
        r = store.rollouts.get(rollout_id)
        if r is None:
            _fail(404, f"no rollout {rollout_id}")
        versions = {d: v["bundle_sha256"] for d, v in store.devices.versions().items()}
        return jsonify({**r, "device_versions": versions})

    @app.post("/api/rollouts/<int:rollout_id>/abort")
    def abort_rollout(rollout_id: int) -> Any:
        _act(require_token, rollouts, "rollouts", lambda: rollouts.abort(rollout_id))
        return jsonify({"id": rollout_id, "aborting": True})

    @app.post("/api/rollouts/<int:rollout_id>/approve")
    def approve_rollout(rollout_id: int) -> Any:
        """A person's approval of a rollout the gateway had no evidence to promote on its own."""
        _act(require_token, rollouts, "rollouts", lambda: rollouts.approve(rollout_id))
        return jsonify({"id": rollout_id, "state": "promoting"})


def _act(require_token: Callable[[], None], service: Any, what: str, action: Callable[[], Any]) -> None:
    """A write action on a gateway service: token, the service present (503), its refusal a 409."""
    require_token()
    if service is None:
        _fail(503, f"this gateway runs no {what}")
    try:
        action()
    except GatewayError as e:
        _fail(409, str(e))


def _register_policy(app: Flask, *, store: GatewayStore, policy: Any, require_token: Callable[[], None]) -> None:
    """The refresh policy (cloud_gateway/policy.py) and the proposals it fired."""
    from .policy import check_policy

    @app.get("/api/policy")
    def get_policy() -> Any:
        return jsonify({"policy": store.policy.get(), "proposals": store.policy.proposals()})

    @app.put("/api/policy")
    def put_policy() -> Any:
        require_token()
        try:
            doc = check_policy(request.get_json(silent=True))
        except GatewayError as e:
            _fail(400, str(e))
        store.policy.set(doc)
        return jsonify({"policy": doc})

    @app.post("/api/policy/proposals/<int:pid>/approve")
    def approve(pid: int) -> Any:
        _act(require_token, policy, "policy", lambda: policy.approve(pid))
        return jsonify({"id": pid, "state": "approved"})


def _store_upload(bundles_dir: Path, trust: TrustPolicy, name: str) -> Any:
    """Verify the request body as a bundle and move it in as ``<name>.tar.gz``; nothing kept on failure."""
    tmp = Path(tempfile.mkdtemp(prefix="upload-", dir=bundles_dir))
    try:
        tar = tmp / "b.tar.gz"
        tar.write_bytes(request.get_data())
        try:
            b = trust.open(tar, extract_to=tmp / "x")  # refuse anything not valid, or not signed by a trusted key
        except BundleTrustError as e:
            _fail(400, f"not a valid bundle: {_scrub(str(e), tmp / 'x', tmp, bundles_dir)}")
        final = bundles_dir / f"{name}.tar.gz"
        tar.replace(final)
        return jsonify({"name": name, "sha256": sha256_file(final), "manifest_sha256": b.manifest_sha256,
                        "url": f"{request.host_url.rstrip('/')}/api/bundles/{name}"}), 201
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _register_dashboard(app: Flask) -> None:
    @app.get("/")
    @app.get("/dashboard")
    def dashboard() -> Response:
        resp = Response(_static("dashboard.html"), mimetype="text/html")
        resp.headers["Content-Security-Policy"] = DASHBOARD_CSP
        return resp

    @app.get("/static/dashboard.js")
    def dashboard_js() -> Response:
        return Response(_static("dashboard.js"), mimetype="application/javascript")

    @app.get("/favicon.ico")
    def favicon() -> Response:  # browsers ask for it; no icon, and no 404 in the console
        return Response(status=204)

    @app.get("/static/dashboard.css")
    def dashboard_css() -> Response:
        return Response(_static("dashboard.css"), mimetype="text/css")
