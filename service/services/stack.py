"""Start, stop and describe the embedded services together, with their URLs on disk."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from service.config import SERVICES_STATE_FILE
from service.services.ports import free_port
from service.services.postgres import EmbeddedPostgres
from service.services.redis import EmbeddedRedis

DEFAULT_PG_PORT = 55432
DEFAULT_REDIS_PORT = 56379


@dataclass
class ServiceStack:
    """The embedded PostgreSQL and Redis that live under one var folder."""

    var_dir: Path
    postgres: EmbeddedPostgres
    redis: EmbeddedRedis

    @classmethod
    def in_dir(cls, var_dir: Path, *, ephemeral: bool = False,
               pg_port: int | None = None, redis_port: int | None = None) -> ServiceStack:
        """The stack of `var_dir`, reusing recorded ports so URLs stay stable between runs."""
        state = read_state(var_dir)
        pg_port = pg_port or state.get("pg_port") or _env_port("LOOKALIKE_PG_PORT", DEFAULT_PG_PORT)
        redis_port = redis_port or state.get("redis_port") or _env_port(
            "LOOKALIKE_REDIS_PORT", DEFAULT_REDIS_PORT)
        return cls(
            var_dir=var_dir,
            postgres=EmbeddedPostgres(var_dir / "pg" / "data", int(pg_port), ephemeral=ephemeral,
                                      shared_buffers=os.environ.get("LOOKALIKE_PG_SHARED_BUFFERS")),
            redis=EmbeddedRedis(var_dir / "redis", int(redis_port)),
        )

    def start(self) -> dict[str, str]:
        """Start both services and record their URLs; returns them."""
        self.var_dir.mkdir(parents=True, exist_ok=True)
        self.postgres.start()
        self.redis.start()
        urls = {"DATABASE_URL": self.postgres.url(), "REDIS_URL": self.redis.url()}
        state = dict(urls, pg_port=self.postgres.port, redis_port=self.redis.port)
        path = self.var_dir / SERVICES_STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.chmod(0o600)
        tmp.replace(path)
        return urls

    def stop(self) -> None:
        """Stop both services; the URLs file goes with them."""
        self.redis.stop()
        self.postgres.stop()
        (self.var_dir / SERVICES_STATE_FILE).unlink(missing_ok=True)

    def status(self) -> dict[str, bool]:
        """Which services are up."""
        return {"postgres": self.postgres.running(), "redis": self.redis.running()}


def _env_port(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def read_state(var_dir: Path) -> dict[str, object]:
    """The recorded ports and URLs, or nothing."""
    try:
        return json.loads((var_dir / SERVICES_STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def ephemeral_stack(var_dir: Path) -> ServiceStack:
    """A throwaway stack on free ports, for tests."""
    return ServiceStack.in_dir(var_dir, ephemeral=True, pg_port=free_port(),
                               redis_port=free_port())
