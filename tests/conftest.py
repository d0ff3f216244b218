"""Real services for the suite: an embedded PostgreSQL + pgvector, Redis and a Celery worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from service.app import create_app
from service.config import PROJECT_ROOT
from service.embedding import registry
from service.migrate import upgrade
from service.services.ports import free_port
from service.services.stack import ServiceStack, ephemeral_stack

CLOTHING = PROJECT_ROOT.parent / "shared" / "datasets" / "clothing"
DEFAULT_MODEL = "efficientnet-lite0"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The installed default model: `make test` installs it under ./var/models first."""
    path = Path(os.environ.get("LOOKALIKE_MODEL_DIR", PROJECT_ROOT / "var" / "models"))
    try:
        registry.verify(path, DEFAULT_MODEL)
    except registry.ModelError:
        path = tmp_path_factory.mktemp("models")
        registry.install(DEFAULT_MODEL, path)
    return path


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    """Throwaway PostgreSQL and Redis on free ports, migrated to head."""
    services = ephemeral_stack(tmp_path_factory.mktemp("services"))
    services.start()
    try:
        upgrade(services.postgres.url())
        yield services
    finally:
        services.stop()


@pytest.fixture(scope="session")
def settings(stack: ServiceStack, model_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The configuration shared by the test app and the worker process."""
    return {
        "DATABASE_URL": stack.postgres.url(),
        "REDIS_URL": stack.redis.url(),
        "STORAGE_DIR": str(tmp_path_factory.mktemp("storage")),
        "MODEL_DIR": str(model_dir),
        "DEFAULT_MODEL": DEFAULT_MODEL,
        "MAX_UPLOAD_BYTES": 5 * 1024 * 1024,
        # The suite's app listens on loopback (keys optional, see tests/api/test_auth.py)
        # and its rate limits are tested on their own app, so no other test trips them.
        "BIND_HOST": "127.0.0.1",
        "RATE_LIMIT_ENABLED": False,
    }


def worker_env(settings: dict[str, Any]) -> dict[str, str]:
    """Environment that points a worker process at the test services."""
    env = dict(os.environ)
    env["DATABASE_URL"] = settings["DATABASE_URL"]
    env["REDIS_URL"] = settings["REDIS_URL"]
    for key in ("STORAGE_DIR", "MODEL_DIR", "DEFAULT_MODEL", "MAX_UPLOAD_BYTES", "BIND_HOST"):
        env[f"LOOKALIKE_{key}"] = str(settings[key])
    for key in ("STORAGE_URL", "STORAGE_S3_ENDPOINT_URL"):  # the object-storage tests'
        if settings.get(key):
            env[f"LOOKALIKE_{key}"] = str(settings[key])
    env["LOOKALIKE_RATE_LIMIT_ENABLED"] = "false"
    return env


def start_worker(settings: dict[str, Any], log_path: Path) -> subprocess.Popen[bytes]:
    """A real Celery worker (prefork, one child), ready when it says so."""
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.celery_app:celery_app", "worker",
         "-c", "1", "-Q", "lookalike", "--loglevel", "INFO", "--without-gossip",
         "--without-mingle", "--without-heartbeat"],
        cwd=PROJECT_ROOT, env=worker_env(settings), stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if b"ready." in log_path.read_bytes():
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited: {log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"worker not ready: {log_path.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def worker(settings: dict[str, Any],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    """One Celery worker for the session."""
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    proc = start_worker(settings, log_path)
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def app(settings: dict[str, Any]) -> Flask:
    """The Flask app bound to the test services."""
    return create_app(settings)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client of the app."""
    return app.test_client()


@pytest.fixture(scope="session")
def clothing() -> Path:
    """The shared clothing photos (CC0), read in place."""
    if not (CLOTHING / "labels.csv").exists():
        pytest.fail(f"the shared clothing dataset is missing at {CLOTHING}")
    return CLOTHING


@pytest.fixture(scope="session")
def photos(clothing: Path) -> list[Path]:
    """A few real photos, sorted for determinism."""
    return sorted((clothing / "images").glob("*.jpg"))[:12]


def wait_for_status(client: FlaskClient, image_id: str, timeout: float = 90.0,
                    want: tuple[str, ...] = ("ready", "failed")) -> dict[str, Any]:
    """Poll an image until the worker has finished with it."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/images/{image_id}").get_json()
        if body.get("status") in want:
            return body
        time.sleep(0.2)
    raise AssertionError(f"image {image_id} still {body.get('status')} after {timeout}s")


@pytest.fixture(scope="module")
def live_server(settings: dict[str, Any],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real service under gunicorn on a free port, pointed at the test services."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("gunicorn") / "gunicorn.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1",
             "--threads", "4", "--timeout", "120", "service.wsgi:app"],
            cwd=PROJECT_ROOT, env=worker_env(settings), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, proc, log_path)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_healthy(base: str, proc: subprocess.Popen[bytes], log_path: Path,
                  timeout: float = 60.0) -> None:
    """Poll /healthz until it answers 200; fail with the server's log if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited: {log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"{base}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or still loading the app
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"not up behind {base}: {log_path.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def live_proxy(settings: dict[str, Any],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real service as `lookalike run` serves it: the embedded nginx in front of gunicorn
    on a unix socket, with 3 s client timeouts so that tests can watch slow clients being cut."""
    from service.services.proxy import EmbeddedProxy, ProxyLimits, nginx_binary

    if nginx_binary() is None:
        pytest.skip("nginx is not installed: `make proxy-deps` installs Debian's nginx-light "
                    "when run as root")
    limits = ProxyLimits(max_body_bytes=int(settings["MAX_UPLOAD_BYTES"]),
                         max_archive_bytes=4 * 1024**3, header_timeout_s=3, body_timeout_s=3,
                         send_timeout_s=5, keepalive_timeout_s=5)
    proxy = EmbeddedProxy(tmp_path_factory.mktemp("proxy"), "127.0.0.1", free_port(), limits,
                          worker_processes="1")
    proxy.prepare()
    log_path = proxy.base_dir / "gunicorn.log"
    env = dict(worker_env(settings), LOOKALIKE_TRUSTED_PROXIES="1")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", *proxy.gunicorn_bind(), "--workers", "1",
             "--threads", "4", "--timeout", "120", "service.wsgi:app"],
            cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        proxy.start()
        _wait_healthy(proxy.url(), proc, log_path)
        yield proxy.url()
    finally:
        proxy.stop()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
