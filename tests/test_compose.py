"""The docker-compose file validates with whichever Compose client this machine has."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from service.config import PROJECT_ROOT


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_file_is_valid() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose client on this machine")
    env = dict(os.environ, POSTGRES_PASSWORD="validation-only",
               MINIO_ROOT_PASSWORD="validation-only", LOOKALIKE_S3_SECRET="validation-only")
    result = subprocess.run([*command, "config", "-q"], cwd=PROJECT_ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    services = subprocess.run([*command, "config", "--services"], cwd=PROJECT_ROOT, env=env,
                              capture_output=True, text=True).stdout.split()
    assert set(services) == {"db", "redis", "minio", "minio-setup", "migrate", "api", "nginx",
                             "worker", "beat"}
