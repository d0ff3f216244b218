"""`lookalike run` keeps its processes alive: a dead one is restarted, a stopped one leaves none."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from service.services.supervisor import MAX_STARTS, Child, supervise_once

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): it has exited all the same.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _wait_exit(child: Child) -> None:
    deadline = time.monotonic() + 10
    while child.exit_code() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_killed_child_is_restarted() -> None:
    child = Child("sleeper", SLEEPER, dict(os.environ))
    child.start()
    try:
        first = child.proc.pid
        os.kill(first, signal.SIGKILL)
        _wait_exit(child)
        events = supervise_once([child])
        assert events == ["sleeper exited with status -9; restarting it"]
        assert child.proc.pid != first and child.exit_code() is None
        assert supervise_once([child]) == []
    finally:
        child.stop()


def test_a_crash_looping_child_is_given_up() -> None:
    child = Child("crasher", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ))
    child.start()
    with pytest.raises(RuntimeError, match="crasher exited"):
        for _ in range(MAX_STARTS + 1):
            _wait_exit(child)
            supervise_once([child])
    child.stop()


def test_stopping_leaves_no_grandchild_behind(tmp_path: Path) -> None:
    """A parent that dies before its worker (as a gunicorn master can) must not orphan it."""
    pid_file = tmp_path / "grandchild.pid"
    script = (f"import subprocess, sys, time\n"
              f"p = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
              f"signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
              f"time.sleep(60)\n")
    child = Child("parent", [sys.executable, "-c", script], dict(os.environ))
    child.start()
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    child.stop(timeout=2)
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), "the grandchild outlived `lookalike run`"
