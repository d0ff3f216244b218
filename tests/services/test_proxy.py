"""The embedded nginx: a config nginx accepts, the compose copy in sync with the template,
unprivileged workers under root, JSON when the API is down, and `lookalike run` without nginx."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from service.config import DEFAULTS, PROJECT_ROOT
from service.services.ports import free_port
from service.services.proxy import (
    SYSTEM_USER,
    EmbeddedProxy,
    ProxyLimits,
    ProxyUnavailable,
    compose_config,
    nginx_binary,
    proxy_for_run,
)

COMPOSE_CONF = PROJECT_ROOT / "deploy" / "nginx" / "nginx.conf"
LIMITS = ProxyLimits(max_body_bytes=DEFAULTS["MAX_UPLOAD_BYTES"],
                     max_archive_bytes=DEFAULTS["MAX_ARCHIVE_BYTES"])
needs_nginx = pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed: "
                                 "`make proxy-deps` installs nginx-light when run as root")


@pytest.fixture
def idle_proxy(tmp_path: Path) -> Iterator[EmbeddedProxy]:
    """nginx in front of a socket nothing listens on."""
    proxy = EmbeddedProxy(tmp_path / "proxy", "127.0.0.1", free_port(), LIMITS,
                          worker_processes="1")
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def test_compose_config_is_the_template_rendered() -> None:
    assert COMPOSE_CONF.read_text() == compose_config(LIMITS), (
        "deploy/nginx/nginx.conf is stale: python -m service.services.proxy rewrites it")


@needs_nginx
def test_compose_config_is_valid_nginx(tmp_path: Path) -> None:
    # Only the image's user, paths and the `api` host name differ from this machine's.
    text = (compose_config(LIMITS).replace("user nginx;", "")
            .replace("/var/cache/nginx", str(tmp_path)).replace("/tmp/nginx.pid",
                                                                 str(tmp_path / "pid"))
            .replace("server api:8000;", "server 127.0.0.1:9;")
            .replace("listen 8080;", f"listen 127.0.0.1:{free_port()};"))
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    result = subprocess.run([str(nginx_binary()), "-t", "-q", "-c", str(conf), "-e",
                             str(tmp_path / "error.log")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@needs_nginx
def test_the_api_down_is_a_json_502_with_retry_after(idle_proxy: EmbeddedProxy) -> None:
    resp = requests.get(f"{idle_proxy.url()}/api/v1/images", timeout=5)
    assert resp.status_code == 502 and resp.headers["Retry-After"] == "5"
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.json()["error"]["code"] == "api_unavailable"


@needs_nginx
def test_only_nginx_workers_reach_the_socket(idle_proxy: EmbeddedProxy) -> None:
    folder = idle_proxy.socket_path.parent.stat()
    assert stat.S_IMODE(folder.st_mode) & 0o007 == 0  # no access for other users
    children = subprocess.run(["ps", "-o", "user=", "--ppid", str(idle_proxy.pid())],
                              capture_output=True, text=True).stdout.split()
    assert children, "no nginx worker"
    if os.geteuid() == 0:
        assert set(children) == {SYSTEM_USER}  # root's master, unprivileged workers
        assert folder.st_gid != 0


def test_stop_ends_nginx_and_start_replaces_a_leftover(tmp_path: Path) -> None:
    if nginx_binary() is None:
        pytest.skip("nginx is not installed")
    proxy = EmbeddedProxy(tmp_path, "127.0.0.1", free_port(), LIMITS, worker_processes="1")
    proxy.start()
    first = proxy.pid()
    proxy.start()  # as after a killed `lookalike run`: the old master goes, a new one serves
    try:
        assert proxy.pid() not in (None, first)
        assert requests.get(f"{proxy.url()}/healthz", timeout=5).status_code == 502
    finally:
        proxy.stop()
    assert not proxy.running()


def test_without_nginx_only_loopback_falls_back(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKALIKE_NGINX", str(tmp_path / "no-nginx"))
    assert nginx_binary() is None
    for host in ("127.0.0.1", "localhost", "::1"):
        assert proxy_for_run(tmp_path, host, 8000, dict(DEFAULTS)) is None
    for host in ("0.0.0.0", "192.168.1.10", "::"):
        with pytest.raises(ProxyUnavailable, match="nginx-light"):
            proxy_for_run(tmp_path, host, 8000, dict(DEFAULTS))


@needs_nginx
def test_run_uses_the_api_limits(tmp_path: Path) -> None:
    settings = dict(DEFAULTS, MAX_UPLOAD_BYTES=1234, MAX_ARCHIVE_BYTES=56789,
                    MANIFEST_MAX_BYTES=999)
    proxy = proxy_for_run(tmp_path, "0.0.0.0", 8000, settings)
    assert proxy is not None
    proxy.prepare()
    text = proxy.conf_file.read_text()
    assert "client_max_body_size 1234;" in text and "client_max_body_size 56789;" in text
    assert "listen 0.0.0.0:8000;" in text and f"server unix:{proxy.socket_path};" in text


def test_run_refuses_a_network_address_without_nginx(settings: dict[str, Any], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from service.cli import main

    monkeypatch.setenv("LOOKALIKE_NGINX", str(tmp_path / "no-nginx"))
    monkeypatch.setenv("LOOKALIKE_MODEL_DIR", settings["MODEL_DIR"])
    env = {"DATABASE_URL": settings["DATABASE_URL"], "REDIS_URL": settings["REDIS_URL"]}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(main, ["run", "--host", "0.0.0.0", "--port", str(free_port())])
    assert result.exit_code != 0
    assert "nginx is not installed" in result.output and "nginx-light" in result.output
