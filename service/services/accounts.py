"""System users for the embedded servers (PostgreSQL refuses root; nginx's workers drop it)."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path


def is_root() -> bool:
    """Whether this process runs as root."""
    return os.geteuid() == 0


def system_user(name: str) -> pwd.struct_passwd:
    """The system user `name`, created (no home, no login shell) if it does not exist yet."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", name], check=True, capture_output=True)
        return pwd.getpwnam(name)


def open_path_to(path: Path) -> None:
    """Let other users traverse (not list) every parent, so a server's user reaches `path`."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o001 == 0:
            parent.chmod(mode | 0o001)
