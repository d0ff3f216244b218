"""An embedded nginx in front of gunicorn: it buffers whole requests and cuts slow clients.

gunicorn's threads read request bodies themselves, so a dozen clients trickling a large upload
at one byte a second hold every thread (gunicorn's deployment docs: put a buffering proxy in
front). nginx reads each request whole, within timeouts, and only then hands it to gunicorn
over a unix socket that only nginx can reach; its own refusals use the API's JSON error shape.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service.services.accounts import is_root, open_path_to, system_user

TEMPLATE = Path(__file__).with_name("nginx.conf.template")
PLACEHOLDER = re.compile(r"@[A-Z_]+@")
SYSTEM_USER = "lookalike-proxy"
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
# gunicorn must accept whatever nginx forwards, so that nginx (in JSON) is the one to refuse:
# an unlimited request line, more and longer header fields than nginx's 8 KB lines allow.
GUNICORN_BEHIND_PROXY = ["--limit-request-line", "0", "--limit-request-fields", "32768",
                         "--limit-request-field_size", "16384"]


@dataclass
class ProxyLimits:
    """Body sizes (the API's own limits) and client timeouts, in bytes and seconds."""

    max_body_bytes: int
    max_archive_bytes: int
    header_timeout_s: int = 15
    body_timeout_s: int = 20
    send_timeout_s: int = 30
    keepalive_timeout_s: int = 15
    keepalive_requests: int = 1000
    # gunicorn's own --timeout is 120 s; nginx waits a little longer for its answer.
    upstream_timeout_s: int = 130
    max_conn_per_client: int = 256
    worker_connections: int = 4096


def nginx_binary() -> Path | None:
    """The nginx to run (LOOKALIKE_NGINX, PATH, Debian's /usr/sbin), or None."""
    explicit = os.environ.get("LOOKALIKE_NGINX")
    if explicit:
        return Path(explicit) if os.access(explicit, os.X_OK) else None
    found = shutil.which("nginx")
    if found:
        return Path(found)
    return next((Path(p) for p in NGINX_CANDIDATES if os.access(p, os.X_OK)), None)


def listen_address(host: str, port: int) -> str:
    """nginx's `listen` argument; IPv6 addresses need brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def render(template: str, values: dict[str, str]) -> str:
    """The template with each @NAME@ replaced; nginx's own $variables stay as they are."""
    for name, value in values.items():
        template = template.replace(f"@{name}@", value)
    left = PLACEHOLDER.search(template)
    if left:
        raise ValueError(f"the nginx template's {left.group(0)} has no value")
    return template


def render_config(*, listen: str, upstream: str, limits: ProxyLimits, pid_file: str,
                  error_log: str, access_log: str, temp_dir: str, user: str | None,
                  daemon: bool = True, worker_processes: str = "auto") -> str:
    """nginx.conf for these addresses, limits and paths."""
    values = {
        "USER": f"user {user};" if user else "# no `user`: nginx runs as whoever starts it",
        "WORKER_PROCESSES": worker_processes,
        "RLIMIT_NOFILE": str(limits.worker_connections * 2),
        "WORKER_CONNECTIONS": str(limits.worker_connections),
        "PID_FILE": pid_file, "ERROR_LOG": error_log, "ACCESS_LOG": access_log,
        "DAEMON": "on" if daemon else "off", "TEMP_DIR": temp_dir,
        "HEADER_TIMEOUT": str(limits.header_timeout_s),
        "BODY_TIMEOUT": str(limits.body_timeout_s),
        "SEND_TIMEOUT": str(limits.send_timeout_s),
        "KEEPALIVE_TIMEOUT": str(limits.keepalive_timeout_s),
        "KEEPALIVE_REQUESTS": str(limits.keepalive_requests),
        "MAX_BODY_BYTES": str(limits.max_body_bytes),
        "MAX_ARCHIVE_BYTES": str(limits.max_archive_bytes),
        "MAX_CONN_PER_CLIENT": str(limits.max_conn_per_client),
        "UPSTREAM_TIMEOUT": str(limits.upstream_timeout_s),
        "UPSTREAM": upstream, "LISTEN": listen,
    }
    return render(TEMPLATE.read_text(), values)








@dataclass
class EmbeddedProxy:
    """nginx on `host`:`port` in front of gunicorn's unix socket, its files in `base_dir`."""

    base_dir: Path
    host: str
    port: int
    limits: ProxyLimits
    worker_processes: str = "auto"
    binary: Path | None = field(default_factory=nginx_binary)

    @property
    def socket_path(self) -> Path:
        """Where gunicorn listens; its folder admits only nginx's workers and the owner."""
        return self.base_dir / "sock" / "api.sock"

    @property
    def conf_file(self) -> Path:
        """The rendered nginx.conf."""
        return self.base_dir / "nginx.conf"

    @property
    def pid_file(self) -> Path:
        """Where the master writes its pid."""
        return self.base_dir / "nginx.pid"

    @property
    def error_log(self) -> Path:
        """nginx's error log (refused clients, timeouts, the API unreachable)."""
        return self.base_dir / "error.log"

    def url(self) -> str:
        """The address clients use."""
        return f"http://{listen_address(self.host, self.port)}"

    def gunicorn_bind(self) -> list[str]:
        """gunicorn's arguments to serve only this proxy."""
        return ["--bind", f"unix:{self.socket_path}", *GUNICORN_BEHIND_PROXY]

    def prepare(self) -> None:
        """Write the config and make the folders (the socket's before gunicorn binds it)."""
        if self.binary is None:
            raise FileNotFoundError("nginx is not installed (Debian: apt-get install -y "
                                    "nginx-light, or `make proxy-deps` as root)")
        sock_dir = self.socket_path.parent
        (self.base_dir / "tmp").mkdir(parents=True, exist_ok=True)
        sock_dir.mkdir(parents=True, exist_ok=True)
        user = None
        sock_dir.chmod(0o700)
        if is_root():
            # Root's nginx master hands requests to unprivileged workers: they need to write
            # the temp folders (nginx chowns them) and to enter the socket's folder.
            account = system_user(SYSTEM_USER)
            user = f"{account.pw_name} {account.pw_name}"
            open_path_to(self.base_dir)
            os.chown(sock_dir, 0, account.pw_gid)
            sock_dir.chmod(0o750)
        text = render_config(
            listen=listen_address(self.host, self.port), upstream=f"unix:{self.socket_path}",
            limits=self.limits, pid_file=str(self.pid_file), error_log=str(self.error_log),
            access_log=str(self.base_dir / "access.log"), temp_dir=str(self.base_dir / "tmp"),
            user=user, worker_processes=self.worker_processes)
        self.conf_file.write_text(text)

    def _nginx(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert self.binary is not None
        return subprocess.run(
            [str(self.binary), "-p", str(self.base_dir), "-c", str(self.conf_file),
             "-e", str(self.error_log), *args], capture_output=True, text=True)

    def start(self, timeout: float = 15.0) -> None:
        """Check the config, start nginx as a daemon and wait until it listens."""
        self.stop()  # one left by a run that was killed may hold another config
        self.prepare()
        for args in (("-t", "-q"), ()):
            result = self._nginx(*args)
            if result.returncode != 0:
                raise RuntimeError(f"nginx failed to start: {result.stderr.strip()[-2000:]}")
        deadline = time.monotonic() + timeout
        while not (self.pid() and _listening(_probe_host(self.host), self.port)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nginx is not listening on {self.url()} after {timeout}s")
            time.sleep(0.05)

    def pid(self) -> int | None:
        """The master's pid if it runs (a stale file's pid, reused by another program, is not)."""
        try:
            pid = int(self.pid_file.read_text().strip())
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if b"nginx" in command else None

    def running(self) -> bool:
        """Whether the master process is alive."""
        return self.pid() is not None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop nginx (fast shutdown) and wait until the master exits."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.pid() == pid and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.pid() == pid:
            os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _probe_host(host: str) -> str:
    """Where to check that nginx listens: the wildcard addresses answer on loopback."""
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    return "::1" if host == "::" else host


def compose_config(limits: ProxyLimits) -> str:
    """deploy/nginx/nginx.conf: the official nginx image (its nginx user, its existing
    /var/cache/nginx) in front of compose's `api`."""
    return render_config(listen="8080", upstream="api:8000", limits=limits,
                         pid_file="/tmp/nginx.pid", error_log="/dev/stderr",
                         access_log="/dev/stdout", temp_dir="/var/cache/nginx", user="nginx",
                         daemon=False, worker_processes="auto")


class ProxyUnavailable(RuntimeError):
    """nginx is missing where serving without it would be unsafe."""


def proxy_for_run(var_dir: Path, host: str, port: int, settings: dict[str, object],
                  binary: Path | None = None) -> EmbeddedProxy | None:
    """The proxy `lookalike run` puts in front of gunicorn; None (gunicorn serves directly)
    only on loopback when nginx is missing. Raises ProxyUnavailable anywhere else."""
    from service.auth.policy import is_loopback

    binary = binary or nginx_binary()
    if binary is None:
        if not is_loopback(host):
            raise ProxyUnavailable(
                f"nginx is not installed, and gunicorn must not face {host} directly (a few "
                "clients sending slowly hold all its threads): run `make proxy-deps` as root "
                "or `apt-get install -y nginx-light`")
        return None
    # Jobs take archives and JSON manifests; every other route takes at most one upload.
    jobs = max(int(str(settings["MAX_ARCHIVE_BYTES"])),
               int(str(settings.get("MANIFEST_MAX_BYTES") or 0)))
    limits = ProxyLimits(max_body_bytes=int(str(settings["MAX_UPLOAD_BYTES"])),
                         max_archive_bytes=jobs)
    return EmbeddedProxy(var_dir / "proxy", host, port, limits, binary=binary)


def wait_for_socket(path: Path, alive: Callable[[], bool], timeout: float = 60.0) -> None:
    """Block until gunicorn has bound its unix socket (or has exited)."""
    deadline = time.monotonic() + timeout
    while not path.is_socket():
        if not alive():
            raise RuntimeError("gunicorn exited before it listened")
        if time.monotonic() > deadline:
            raise TimeoutError(f"gunicorn has not bound {path} after {timeout:.0f}s")
        time.sleep(0.05)


def write_compose_config() -> Path:
    """Regenerate deploy/nginx/nginx.conf from the template and the API's default limits."""
    from service.config import DEFAULTS, PROJECT_ROOT

    path = PROJECT_ROOT / "deploy" / "nginx" / "nginx.conf"
    path.write_text(compose_config(ProxyLimits(max_body_bytes=DEFAULTS["MAX_UPLOAD_BYTES"],
                                               max_archive_bytes=DEFAULTS["MAX_ARCHIVE_BYTES"])))
    return path


if __name__ == "__main__":
    print(write_compose_config())
