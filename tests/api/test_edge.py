"""The HTTP edge against hostile clients, on the real servers: gunicorn alone (`live_server`) for
what Flask guarantees by itself, and behind the embedded nginx (`live_proxy`) for slow clients
and malformed requests that never reach Flask."""

from __future__ import annotations

import contextlib
import json
import secrets
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from flask import Flask

from service.app import create_app

PHOTO_COLLECTION = "edge"


def _upload(base: str, photo: Path, extra: bytes, headers: dict[str, str] | None = None,
            collection: str = PHOTO_COLLECTION) -> requests.Response:
    data = photo.read_bytes() + extra  # distinct bytes, so never a duplicate of another test's
    return requests.post(f"{base}/api/v1/images", timeout=15, headers=headers or {},
                         files={"file": ("x.jpg", data, "image/jpeg")},
                         data={"collection": collection})


def _error_code(resp: requests.Response) -> str:
    assert resp.headers["Content-Type"].startswith("application/json"), resp.text[:300]
    body = resp.json()
    assert set(body["error"]) >= {"code", "message"}, body
    return str(body["error"]["code"])


def _port(base: str) -> int:
    return int(urlsplit(base).port or 80)


# ---- Host and Origin in open (loopback) mode ---------------------------------------------------
@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example",
                                  "localhost.evil.example:{port}", "10.0.0.5:{port}"])
def test_a_foreign_host_is_refused_in_open_mode(live_server: str, photos: list[Path],
                                                host: str) -> None:
    header = {"Host": host.format(port=_port(live_server))}
    resp = requests.get(f"{live_server}/api/v1/images?limit=1", headers=header, timeout=5)
    assert resp.status_code in (400, 421) and _error_code(resp) == "host_not_allowed"
    upload = _upload(live_server, photos[0], b"edge-host-" + host.encode(), header)
    assert upload.status_code in (400, 421) and _error_code(upload) == "host_not_allowed"
    assert requests.get(f"{live_server}/", headers=header, timeout=5).status_code in (400, 421)


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST",
                                  "127.0.0.2:{port}", "[::1]:{port}", "[::1]"])
def test_loopback_host_names_are_served(live_server: str, host: str) -> None:
    header = {"Host": host.format(port=_port(live_server))}
    resp = requests.get(f"{live_server}/api/v1/images?limit=1", headers=header, timeout=5)
    assert resp.status_code == 200, resp.text


def test_cross_site_writes_are_refused_and_same_origin_ones_work(live_server: str,
                                                                 photos: list[Path]) -> None:
    own = f"http://127.0.0.1:{_port(live_server)}"
    for i, headers in enumerate([{"Origin": "http://evil.example"},
                                 {"Origin": "null"},
                                 {"Origin": f"http://localhost:{_port(live_server) + 1}"},
                                 {"Sec-Fetch-Site": "cross-site"},
                                 {"Origin": own, "Sec-Fetch-Site": "cross-site"}]):
        resp = _upload(live_server, photos[1], f"edge-xsite-{i}".encode(), headers)
        assert resp.status_code == 403 and _error_code(resp) == "cross_site_request", headers
    jobs = requests.post(f"{live_server}/api/v1/jobs", json={"collection": PHOTO_COLLECTION,
                                                             "manifest": []},
                         headers={"Origin": "http://evil.example"}, timeout=5)
    assert jobs.status_code == 403 and _error_code(jobs) == "cross_site_request"

    same = _upload(live_server, photos[1], b"edge-same-origin",
                   {"Origin": own, "Sec-Fetch-Site": "same-origin"})
    assert same.status_code in (200, 202), same.text
    image_id = same.json()["id"]
    bare = _upload(live_server, photos[1], b"edge-no-origin")  # curl, the CLI
    assert bare.status_code in (200, 202), bare.text

    # Reads stay open to other origins (no CORS header, so their scripts cannot read them);
    # a cross-site DELETE is refused and the image survives it.
    evil = {"Origin": "http://evil.example"}
    assert requests.get(f"{live_server}/api/v1/images/{image_id}", headers=evil,
                        timeout=5).status_code == 200
    gone = requests.delete(f"{live_server}/api/v1/images/{image_id}", headers=evil, timeout=5)
    assert gone.status_code == 403 and _error_code(gone) == "cross_site_request"
    assert requests.get(f"{live_server}/api/v1/images/{image_id}", timeout=5).status_code == 200


def test_allowed_hosts_setting_extends_the_loopback_names(settings: dict[str, Any]) -> None:
    app = create_app(dict(settings, ALLOWED_HOSTS="photos.lan, .example.org"))
    client = app.test_client()
    for host in ("photos.lan", "photos.lan:8000", "a.example.org", "example.org", "127.0.0.1"):
        assert client.get("/api/v1/images?limit=1", headers={"Host": host}).status_code == 200
    for host in ("evil.example", "photos.lan.evil.example", "notexample.org"):
        resp = client.get("/api/v1/images?limit=1", headers={"Host": host})
        assert resp.status_code == 421 and resp.get_json()["error"]["code"] == "host_not_allowed"
    # Behind a TLS-terminating proxy the Origin is https and the Host has no port.
    resp = client.delete("/api/v1/images/00000000-0000-0000-0000-000000000000",
                         headers={"Host": "photos.lan", "Origin": "https://photos.lan"})
    assert resp.status_code == 404


def test_keyed_mode_checks_hosts_only_when_configured(settings: dict[str, Any]) -> None:
    keyed = create_app(dict(settings, AUTH_REQUIRED="true"))
    resp = keyed.test_client().get("/api/v1/images", headers={"Host": "api.example"})
    assert resp.status_code == 401  # no allow-list: any Host, the key decides
    listed = create_app(dict(settings, AUTH_REQUIRED="true", ALLOWED_HOSTS=["api.example"]))
    client = listed.test_client()
    assert client.get("/api/v1/images", headers={"Host": "api.example"}).status_code == 401
    resp = client.get("/api/v1/images", headers={"Host": "evil.example"})
    assert resp.status_code == 421 and resp.get_json()["error"]["code"] == "host_not_allowed"


def test_every_response_carries_the_browser_security_headers(live_server: str) -> None:
    for path in ("/", "/browse", "/api/v1/images?limit=1", "/api/v1/nothing-here", "/healthz",
                 "/static/web/app.js"):
        resp = requests.get(f"{live_server}{path}", timeout=5)
        headers = resp.headers
        csp = headers.get("Content-Security-Policy", "")
        assert "frame-ancestors 'none'" in csp, (path, csp)
        assert headers.get("X-Frame-Options") == "DENY", path
        assert headers.get("X-Content-Type-Options") == "nosniff", path
        assert headers.get("Referrer-Policy") == "no-referrer", path
    page = requests.get(f"{live_server}/", timeout=5).headers["Content-Security-Policy"]
    assert "script-src 'self'" in page and "'unsafe-inline'" not in page
    assert "default-src 'self'" in page and "object-src 'none'" in page
    refused = requests.get(f"{live_server}/", headers={"Host": "evil.example"}, timeout=5)
    assert refused.headers.get("X-Frame-Options") == "DENY"


def test_behind_a_trusted_proxy_rate_limits_count_each_client(settings: dict[str, Any]) -> None:
    # Behind nginx every request comes from its socket: without ProxyFix all clients would
    # share one budget. The proxy sets X-Forwarded-For to the client's address.
    app = create_app(dict(settings, TRUSTED_PROXIES=1, RATE_LIMIT_ENABLED=True,
                          RATE_LIMIT_DEFAULT="2/day"))
    client = app.test_client()
    net = f"10.{secrets.randbelow(250)}.{secrets.randbelow(250)}"
    first, second = {"X-Forwarded-For": f"{net}.1"}, {"X-Forwarded-For": f"{net}.2"}
    assert [client.get("/api/v1/images?limit=1", headers=first).status_code
            for _ in range(3)] == [200, 200, 429]
    assert client.get("/api/v1/images?limit=1", headers=second).status_code == 200


def test_an_app_built_from_the_factory_has_the_edge(app: Flask) -> None:
    resp = app.test_client().get("/healthz", headers={"Host": "evil.example"})
    assert resp.status_code == 421


# ---- behind the proxy: slow clients --------------------------------------------------------------
SLOW_BODIES = 20
SLOW_HEADERS = 20


def _open_slow(base: str, *, body: bool) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", _port(base)), timeout=5)
    head = (f"POST /api/v1/images HTTP/1.1\r\nHost: 127.0.0.1:{_port(base)}\r\n"
            "Content-Type: multipart/form-data; boundary=slow\r\n")
    if body:  # complete headers promising 1 MB, then the body one byte at a time
        sock.sendall((head + "Content-Length: 1000000\r\n\r\n-").encode())
    else:  # the headers themselves never end
        sock.sendall(head.encode())
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        while True:
            chunk = sock.recv(65536, socket.MSG_DONTWAIT)
            if not chunk:
                return True
    except BlockingIOError:
        return False  # an answer (say, a 408) arrived but the connection is still open
    except OSError:
        return True


def _trickle(socks: list[socket.socket], stop: threading.Event, body: bool) -> None:
    while not stop.wait(1.0):
        for sock in socks:
            with contextlib.suppress(OSError):  # cut: that is the point
                sock.send(b"x" if body else b"X")


def slow_clients_leave_the_api_serving(base: str, photo: Path, cut_within_s: float) -> None:
    """40 connections trickle a 1 MB upload (or its headers) while real requests get answers;
    once they stall, the server cuts every one of them."""
    bodies = [_open_slow(base, body=True) for _ in range(SLOW_BODIES)]
    heads = [_open_slow(base, body=False) for _ in range(SLOW_HEADERS)]
    stop = threading.Event()
    trickles = [threading.Thread(target=_trickle, args=(bodies, stop, True), daemon=True),
                threading.Thread(target=_trickle, args=(heads, stop, False), daemon=True)]
    for thread in trickles:
        thread.start()
    try:
        time.sleep(1.5)  # every slow request is past its headers (or inside them) by now
        for _ in range(3):
            resp = requests.get(f"{base}/healthz", timeout=5)
            assert resp.status_code == 200
        upload = _upload(base, photo, b"edge-slowloris-" + str(time.time()).encode())
        assert upload.status_code in (200, 202), upload.text
        got = requests.get(f"{base}/api/v1/images/{upload.json()['id']}", timeout=5)
        assert got.status_code == 200 and got.json()["collection"] == PHOTO_COLLECTION
        # Still trickling, the bodies are alive: the proxy buffers them, not the API.
        assert not any(_closed_by_peer(s) for s in bodies)
        stop.set()
        deadline = time.monotonic() + cut_within_s
        open_socks = bodies + heads
        while open_socks and time.monotonic() < deadline:
            open_socks = [s for s in open_socks if not _closed_by_peer(s)]
            time.sleep(0.2)
        assert not open_socks, f"{len(open_socks)} slow connections still open"
    finally:
        stop.set()
        for sock in bodies + heads:
            sock.close()
    assert requests.get(f"{base}/healthz", timeout=5).status_code == 200


@pytest.mark.timeout(90)
def test_slow_uploads_do_not_freeze_the_api(live_proxy: str, photos: list[Path]) -> None:
    # The fixture's client timeouts are 3 s; allow that plus scheduling slack.
    slow_clients_leave_the_api_serving(live_proxy, photos[2], cut_within_s=15)


# ---- behind the proxy: malformed requests get the JSON error shape ------------------------------
def _raw(base: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; the answer's status, headers and body (read to Content-Length:
    after refusing a body, nginx keeps the connection open a while to drain it)."""
    with socket.create_connection(("127.0.0.1", _port(base)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while True:
            head, found, body = data.partition(b"\r\n\r\n")
            if found:
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":")
                                                                       for line in lines[1:])}
                if len(body) >= int(headers.get("content-length", "-1")) >= 0:
                    return int(lines[0].split()[1]), headers, body
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise AssertionError(f"the connection closed mid-answer: {data[:300]!r}")
            data += chunk


def _assert_json_error(status: int, headers: dict[str, str], body: bytes) -> str:
    assert 400 <= status < 500, (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), (headers, body[:300])
    error = json.loads(body)["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str)
    return str(error["code"])


def test_malformed_headers_get_json_errors_from_the_proxy(live_proxy: str) -> None:
    host = f"Host: 127.0.0.1:{_port(live_proxy)}\r\n".encode()
    nul = (b"GET /api/v1/images HTTP/1.1\r\n" + host +
           b"Authorization: Bearer lk_abc\x00def\r\nConnection: close\r\n\r\n")
    _assert_json_error(*_raw(live_proxy, nul))

    huge = requests.get(f"{live_proxy}/api/v1/images", timeout=5,
                        headers={"Authorization": "Bearer " + "a" * 10_240})
    assert 400 <= huge.status_code < 500
    _error_code(huge)

    long_uri = requests.get(f"{live_proxy}/api/v1/images?q={'b' * 20_000}", timeout=5)
    assert long_uri.status_code in (414, 400, 431)
    _error_code(long_uri)

    # What nginx lets through, gunicorn accepts: the API answers, in JSON, not gunicorn.
    for resp in (requests.get(f"{live_proxy}/api/v1/images?limit=1&q={'b' * 6000}", timeout=5),
                 requests.get(f"{live_proxy}/api/v1/images?limit=1", timeout=5,
                              headers={f"X-Pad-{i}": "p" * 7000 for i in range(3)}),
                 requests.get(f"{live_proxy}/api/v1/images?limit=1", timeout=5,
                              headers={f"X-Many-{i}": "m" for i in range(150)})):
        assert resp.status_code in (200, 400), resp.text[:300]
        assert resp.headers.get("Server") != "gunicorn" and resp.json()
    garbage = _raw(live_proxy, b"\x16\x03\x01 not http at all\r\n\r\n")
    _assert_json_error(*garbage)
    assert requests.get(f"{live_proxy}/healthz", timeout=5).status_code == 200


def test_over_limit_bodies_get_json_413_from_the_proxy(live_proxy: str,
                                                       settings: dict[str, Any]) -> None:
    host = f"Host: 127.0.0.1:{_port(live_proxy)}\r\n".encode()
    too_big = int(settings["MAX_UPLOAD_BYTES"]) + 1
    request = (b"POST /api/v1/images HTTP/1.1\r\n" + host +
               b"Content-Type: multipart/form-data; boundary=x\r\n"
               b"Content-Length: " + str(too_big).encode() + b"\r\nConnection: close\r\n\r\n")
    status, headers, body = _raw(live_proxy, request)
    assert status == 413 and _assert_json_error(status, headers, body) == "payload_too_large"
    # An archive may be far larger than one upload, but not unbounded.
    archive = (b"POST /api/v1/jobs HTTP/1.1\r\n" + host +
               b"Content-Type: application/zip\r\nContent-Length: " + str(8 * 1024**4).encode() +
               b"\r\nConnection: close\r\n\r\n")
    status, headers, body = _raw(live_proxy, archive)
    assert status == 413 and _assert_json_error(status, headers, body) == "payload_too_large"
    assert requests.get(f"{live_proxy}/healthz", timeout=5).status_code == 200


def test_the_proxy_passes_api_errors_and_the_edge_checks_through(live_proxy: str) -> None:
    missing = requests.get(f"{live_proxy}/api/v1/images/not-an-id", timeout=5)
    assert missing.status_code == 404 and _error_code(missing) == "not_found"
    foreign = requests.get(f"{live_proxy}/api/v1/images", headers={"Host": "evil.example"},
                           timeout=5)
    assert foreign.status_code == 421 and _error_code(foreign) == "host_not_allowed"
    assert requests.get(f"{live_proxy}/", timeout=5).headers["X-Frame-Options"] == "DENY"
