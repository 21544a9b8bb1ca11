"""The HTTP API on waitress: JSON errors, bad parameters, relative paths, no server paths, CSP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cloud_gateway.api import DASHBOARD_CSP, create_app
from cloud_gateway.metrics import Metrics
from cloud_gateway.service import HttpServer
from cloud_gateway.store import GatewayStore
from tests.agent.tiny import release_trust


def _get(url: str, *, method: str = "GET", data: bytes | None = None, token: str | None = None):
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture
def api(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --bundles-dir, resolved against the working directory
    store = GatewayStore("gw.sqlite")
    store.devices.set_status("dev-a", {"state": "online"})
    app = create_app(store=store, metrics=Metrics(), bundles_dir=Path("rel-bundles"), token="tok", trust=release_trust())
    server = HttpServer(app, "127.0.0.1", 0, threads=2)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}", tmp_path
    finally:
        server.stop()


def _json_error(code, headers, body, expected):
    assert code == expected, (code, body)
    assert headers["Content-Type"] == "application/json", headers
    msg = json.loads(body)
    assert msg["ok"] is False and msg["error"]
    return msg["error"]


def test_errors_are_json_and_never_echo_the_request(api):
    url, _ = api
    code, headers, body = _get(url + "/nope/%3Cscript%3Ealert(1)%3C/script%3E")
    _json_error(code, headers, body, 404)
    assert b"script" not in body and b"nope" not in body
    assert headers["X-Content-Type-Options"] == "nosniff"
    _json_error(*_get(url + "/api/devices/%3Cimg%20src=x%3E"), 404)
    assert "integer" in _json_error(*_get(url + "/api/devices/dev-a?history=abc"), 400)
    assert _get(url + "/api/devices/dev-a?history=3")[0] == 200
    _json_error(*_get(url + "/healthz", method="DELETE"), 405)
    assert "token" in _json_error(*_get(url + "/api/bundles/x", method="PUT", data=b"x"), 401)
    assert _get(url + "/healthz")[1]["Server"] == "cloud-gateway"  # waitress, not werkzeug's dev server


def test_relative_bundles_dir_serves_downloads_and_upload_errors_show_no_server_paths(api, tiny_cascade):
    url, root = api
    data = tiny_cascade.tarball.read_bytes()
    code, _, body = _get(url + "/api/bundles/v1", method="PUT", data=data, token="tok")
    assert code == 201, body
    assert (root / "rel-bundles" / "v1.tar.gz").is_file()
    code, headers, got = _get(url + "/api/bundles/v1")
    assert code == 200 and got == data and headers["Content-Type"] == "application/gzip"
    err = _json_error(*_get(url + "/api/bundles/junk", method="PUT", data=b"garbage" * 100, token="tok"), 400)
    assert "not a valid bundle" in err
    assert str(root) not in err and "/tmp" not in err and "upload-" not in err, err


def test_dashboard_has_a_content_security_policy(api):
    url, _ = api
    code, headers, body = _get(url + "/")
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    assert headers["Content-Security-Policy"] == DASHBOARD_CSP and "unsafe-inline" not in DASHBOARD_CSP
    assert b"<style" not in body and b"style=" not in body and b"<script>" not in body  # all from 'self' files
    for asset, kind in (("dashboard.js", "application/javascript"), ("dashboard.css", "text/css")):
        code, headers, _ = _get(f"{url}/static/{asset}")
        assert code == 200 and headers["Content-Type"].startswith(kind)


def _raw(url: str, head: str, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """Send only a request's headers (no body byte) and read the answer: a server that waits for the body
    before answering times out here."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(head.encode() + b"\r\n")
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
                    dict(_headers(data)).get("content-length", "0")):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pytest.fail(f"no answer before the body was sent (got {data!r})")
    status = int(data.split(b" ", 2)[1])
    return status, dict(_headers(data)), data.split(b"\r\n\r\n", 1)[1]


def _headers(data: bytes) -> list[tuple[str, str]]:
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return [(k.strip().lower(), v.strip()) for k, v in (ln.split(":", 1) for ln in lines if ":" in ln)]


def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(api):
    url, _ = api
    size = 300 << 20
    for auth, code in (("", 401), ("Authorization: Bearer wrong\r\n", 401)):
        status, headers, body = _raw(url, f"PUT /api/bundles/big HTTP/1.1\r\nHost: x\r\n{auth}"
                                          f"Content-Length: {size}\r\n")
        assert status == code and headers["content-type"] == "application/json", (status, headers, body)
        assert json.loads(body)["error"] == "missing or wrong token"
    # chunked bodies too, and POSTs to any write route
    status, _, body = _raw(url, "POST /api/rollouts HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n")
    assert status == 401, body


def test_a_body_past_the_bundle_limit_is_413_at_once(api):
    from cloud_gateway.api import MAX_BUNDLE_BYTES

    url, _ = api
    status, headers, body = _raw(url, f"PUT /api/bundles/big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n"
                                      f"Content-Length: {MAX_BUNDLE_BYTES + 1}\r\n")
    assert status == 413 and headers["content-type"] == "application/json", (status, body)
    assert f"larger than {MAX_BUNDLE_BYTES} bytes" in json.loads(body)["error"]


def test_with_writes_off_a_body_is_refused_from_the_headers(tmp_path):
    store = GatewayStore(str(tmp_path / "gw.sqlite"))
    app = create_app(store=store, metrics=Metrics(), bundles_dir=tmp_path / "b", token=None, trust=release_trust())
    server = HttpServer(app, "127.0.0.1", 0, threads=2)
    server.start()
    try:
        status, _, body = _raw(f"http://127.0.0.1:{server.port}",
                               "PUT /api/bundles/big HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n")
    finally:
        server.stop()
    assert status == 403 and "--token" in json.loads(body)["error"]


@pytest.fixture
def rollout_api(tmp_path):
    from cloud_gateway.rollout import RolloutManager

    store = GatewayStore(str(tmp_path / "gw.sqlite"))
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    (tmp_path / "evil.tar.gz").write_bytes(b"outside the store")
    rollouts = RolloutManager(store=store, bundles_dir=bundles, send_command=lambda d, c: None,
                              base_url=lambda: "http://127.0.0.1:1")
    app = create_app(store=store, metrics=Metrics(), bundles_dir=bundles, token="tok", trust=release_trust(),
                     rollouts=rollouts)
    server = HttpServer(app, "127.0.0.1", 0, threads=2)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        rollouts.stop()


def _post_json(url: str, raw: bytes, token: str = "tok"):
    req = urllib.request.Request(url, data=raw, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.mark.parametrize("watch", ["NaN", "Infinity", "-1", "0", "1e300"])
def test_a_rollout_watch_must_be_finite_positive_and_bounded(rollout_api, watch):
    raw = ('{"bundle": "v1", "canary": "50%", "watch_s": ' + watch + "}").encode()
    err = _json_error(*_post_json(rollout_api + "/api/rollouts", raw), 400)
    assert "watch_s: the watch window must be a number of seconds" in err, err


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "x\\y"])
def test_a_rollout_bundle_is_a_name_not_a_path(rollout_api, name):
    raw = json.dumps({"bundle": name, "canary": "50%", "watch_s": 5}).encode()
    err = _json_error(*_post_json(rollout_api + "/api/rollouts", raw), 400)
    assert "is not a bundle name" in err, err


def test_the_rollout_cli_says_why_in_one_line(rollout_api, capsys, tmp_path, monkeypatch):
    from cloud_gateway.cli import main as gw

    monkeypatch.chdir(tmp_path)  # "../evil" must not name a file here
    for args, msg in ((["../evil", "--watch", "5"], "is not a bundle name"),
                      (["v1", "--watch", "nan"], "watch_s: the watch window")):
        assert gw(["rollout", "start", *args, "--gateway", rollout_api, "--token", "tok"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err and "400" in err, err


@pytest.mark.parametrize("path", ["/api/samples/{}/label", "/api/rollouts/{}/abort",
                                  "/api/policy/proposals/{}/approve"])
def test_ids_past_64_bits_are_a_400(rollout_api, path):
    for big in (1 << 63, 10 ** 30):
        err = _json_error(*_post_json(rollout_api + path.format(big), b'{"label": 0}'), 400)
        assert f"{big} is not an id" in err, err
    err = _json_error(*_get(rollout_api + f"/api/rollouts/{1 << 63}"), 400)
    assert "is not an id" in err
    assert _get(rollout_api + f"/api/rollouts/{(1 << 63) - 1}")[0] == 404  # the largest id is an id
