"""Flask HTTP API: health, Prometheus metrics, devices, bundles, commands, dashboard.

Reads are open (devices fetch bundles without credentials; the agent checks
every hash anyway); writes (bundle upload, device commands) need the
gateway's token as ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import re
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from flask import Flask, Response, abort, jsonify, request, send_file

from edgecore import wire
from edgecore.bundle import open_bundle, sha256_file
from edgecore.errors import BundleTrustError

from .metrics import Metrics
from .store import TelemetryStore

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
MAX_BUNDLE_BYTES = 512 << 20


def _static(name: str) -> str:
    return resources.files("cloud_gateway").joinpath("static", name).read_text()


def _device_view(row: dict[str, Any]) -> dict[str, Any]:
    tel = row.get("last_telemetry") or {}
    drift = tel.get("drift") or {}
    status = row.get("status") or {}
    return {
        "device_id": row["device_id"],
        "state": status.get("state", "unknown"),
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


def create_app(
    *,
    store: TelemetryStore,
    metrics: Metrics,
    bundles_dir: Path,
    token: str | None,
    publish: Callable[[str, bytes], None] | None = None,
    prefix: str = "fleet",
    health: Callable[[], dict[str, Any]] | None = None,
) -> Flask:
    app = Flask("cloud_gateway")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BUNDLE_BYTES
    bundles_dir = Path(bundles_dir)
    bundles_dir.mkdir(parents=True, exist_ok=True)

    def require_token() -> None:
        if not token:
            abort(Response("write endpoints are disabled: start the gateway with --token\n", 403))
        got = request.headers.get("Authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
            abort(Response("missing or wrong token\n", 401))

    @app.get("/healthz")
    def healthz() -> Any:
        h = {"ok": True, **(health() if health else {})}
        return jsonify(h), (200 if h.get("ok") else 503)

    @app.get("/metrics")
    def prom() -> Response:
        return Response(metrics.render(), mimetype="text/plain; version=0.0.4")

    @app.get("/api/devices")
    def list_devices() -> Any:
        return jsonify([_device_view(r) for r in store.devices()])

    @app.get("/api/devices/<device_id>")
    def one_device(device_id: str) -> Any:
        row = store.device(device_id)
        if row is None:
            abort(Response(f"unknown device {device_id}\n", 404))
        limit = min(max(int(request.args.get("history", 200)), 0), 5000)
        return jsonify({**_device_view(row), "history": store.history(device_id, limit=limit)})

    @app.post("/api/devices/<device_id>/cmd")
    def command(device_id: str) -> Any:
        require_token()
        if publish is None:
            abort(Response("this gateway has no MQTT link\n", 503))
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or body.get("cmd") not in ("set_threshold", "update_bundle", "bench"):
            abort(Response("body must be a JSON command (cmd: set_threshold|update_bundle|bench)\n", 400))
        if not _NAME_RE.match(device_id):
            abort(Response("bad device id\n", 400))
        publish(wire.Topics.of(prefix, device_id, wire.Topics.CMD), wire.dumps({k: v for k, v in body.items() if k != "schema"}))
        return jsonify({"ok": True})

    @app.get("/api/bundles")
    def list_bundles() -> Any:
        return jsonify([{"name": p.name.removesuffix(".tar.gz"), "sha256": sha256_file(p), "size": p.stat().st_size}
                        for p in sorted(bundles_dir.glob("*.tar.gz"))])

    @app.get("/api/bundles/<name>")
    def get_bundle(name: str) -> Any:
        name = name.removesuffix(".tar.gz")
        p = bundles_dir / f"{name}.tar.gz"
        if not _NAME_RE.match(name) or not p.is_file():
            abort(Response(f"no bundle {name}\n", 404))
        return send_file(p, mimetype="application/gzip", download_name=p.name)

    @app.put("/api/bundles/<name>")
    @app.post("/api/bundles/<name>")
    def put_bundle(name: str) -> Any:
        require_token()
        name = name.removesuffix(".tar.gz")
        if not _NAME_RE.match(name):
            abort(Response("bundle name: 1-100 characters from A-Z a-z 0-9 _ . -\n", 400))
        tmp = Path(tempfile.mkdtemp(prefix="upload-", dir=bundles_dir))
        try:
            tar = tmp / "b.tar.gz"
            tar.write_bytes(request.get_data())
            try:
                b = open_bundle(tar, extract_to=tmp / "x")  # refuse anything that is not a valid bundle
            except BundleTrustError as e:
                abort(Response(f"not a valid bundle: {e}\n", 400))
            final = bundles_dir / f"{name}.tar.gz"
            tar.replace(final)
            return jsonify({"name": name, "sha256": sha256_file(final), "manifest_sha256": b.manifest_sha256,
                            "url": f"{request.host_url.rstrip('/')}/api/bundles/{name}"}), 201
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @app.get("/")
    @app.get("/dashboard")
    def dashboard() -> Response:
        return Response(_static("dashboard.html"), mimetype="text/html")

    @app.get("/static/dashboard.js")
    def dashboard_js() -> Response:
        return Response(_static("dashboard.js"), mimetype="application/javascript")

    return app
