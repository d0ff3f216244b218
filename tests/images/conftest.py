"""Both content-store backends for the image tests: local disk, and S3 over real HTTP.

The S3 endpoint is moto's standalone server in a process of its own on a free port: the
service's boto3 client, its workers and its gunicorn talk HTTP to it as they would to AWS or
MinIO; nothing in the client is patched.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from flask import Flask

from service.app import create_app
from service.config import PROJECT_ROOT
from service.images.storage import ContentStore, LocalContentStore, open_store
from service.services.ports import free_port
from tests.conftest import _wait_healthy
from tests.jobs.conftest import job_settings, job_worker_env, kill_group, start_job_worker

BUCKET = "lookalike-test"
PREFIX = "originals"
S3_QUEUE = "lookalike-s3-test"
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on a free port, with the test bucket; fake credentials in the env."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        for key, value in FAKE_AWS.items():
            env.setenv(key, value)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    requests.get(f"{url}/moto-api/", timeout=2)
                    break
                except requests.ConnectionError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"moto did not start: {log_path.read_text()}") from None
                    time.sleep(0.2)
            s3_client(url).create_bucket(Bucket=BUCKET)
            yield url
        finally:
            kill_group(proc, signal.SIGTERM)


def s3_client(endpoint: str) -> Any:
    """A plain boto3 client of the test endpoint, for looking into the bucket."""
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def bucket_keys(endpoint: str) -> set[str]:
    """Every key in the test bucket."""
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


@pytest.fixture(scope="session")
def s3_settings(settings: dict[str, Any], s3_endpoint: str) -> dict[str, Any]:
    """The session settings with originals in the bucket and a queue of their own."""
    return job_settings(settings, S3_QUEUE, STORAGE_URL=f"s3://{BUCKET}/{PREFIX}",
                        STORAGE_S3_ENDPOINT_URL=s3_endpoint)


@pytest.fixture(scope="session")
def s3_app(s3_settings: dict[str, Any]) -> Flask:
    """An app whose content store is the bucket."""
    return create_app(s3_settings)


@pytest.fixture(scope="session")
def s3_worker(s3_settings: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[subprocess.Popen[bytes]]:
    """A real Celery worker reading originals from the bucket, on the S3 tests' queue."""
    proc = start_job_worker(s3_settings, tmp_path_factory.mktemp("s3-worker") / "worker.log")
    yield proc
    kill_group(proc, signal.SIGTERM)


@pytest.fixture(scope="module")
def s3_live_server(s3_settings: dict[str, Any],
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """gunicorn serving the S3-backed app on a free port."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("gunicorn-s3") / "gunicorn.log"
    env = job_worker_env(s3_settings)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1",
             "--threads", "4", "--timeout", "120", "service.wsgi:app"],
            cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
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


@dataclass
class Backend:
    """One backend as the tests see it: its app, its store and a view from outside."""

    name: str
    settings: dict[str, Any]
    app: Flask
    store: ContentStore
    keys: Callable[[], set[str]]  # every object or file the store holds, relative names
    live_server: Callable[[], str]

    def has_original(self, digest: str) -> bool:
        """Whether the original is there, looked at from outside the service."""
        return any(k.endswith(f"/{digest}") for k in self.keys())

    def has_thumbnail(self, digest: str) -> bool:
        """Whether a thumbnail of the digest is there, looked at from outside."""
        return any(k.endswith(f"/{digest}.jpg") for k in self.keys())

    def remove_behind_the_back(self, digest: str) -> None:
        """Delete the original without the service knowing (an operator, a lifecycle rule)."""
        if isinstance(self.store, LocalContentStore):
            self.store.path(digest).unlink()
        else:
            s3_client(self.settings["STORAGE_S3_ENDPOINT_URL"]).delete_object(
                Bucket=BUCKET, Key=f"{PREFIX}/{digest[:2]}/{digest[2:4]}/{digest}")


def _local_keys(root: Path) -> Callable[[], set[str]]:
    return lambda: {p.relative_to(root).as_posix() for p in root.rglob("*")
                    if p.is_file() and "jobs" not in p.relative_to(root).parts}


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, settings: dict[str, Any], app: Flask) -> Backend:
    """Each content-store backend in turn (the S3 server starts only when needed)."""
    if request.param == "local":
        return Backend("local", settings, app, open_store(settings),
                       _local_keys(Path(settings["STORAGE_DIR"])),
                       lambda: request.getfixturevalue("live_server"))
    s3 = request.getfixturevalue("s3_settings")
    return Backend("s3", s3, request.getfixturevalue("s3_app"), open_store(s3),
                   lambda: bucket_keys(s3["STORAGE_S3_ENDPOINT_URL"]),
                   lambda: request.getfixturevalue("s3_live_server"))
