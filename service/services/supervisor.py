"""The processes `lookalike run` keeps alive: restarted when they die, stopped with their group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field

# A child that dies this many times within the window is crash-looping: restarting it again
# only hides the cause.
MAX_STARTS = 5
WINDOW_S = 60.0


@dataclass
class Child:
    """One supervised process, in a session of its own so that its whole group can be stopped."""

    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    starts: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_STARTS))

    def start(self) -> None:
        """Start (or start again) the process."""
        # A session of its own: the terminal's Ctrl-C reaches only `lookalike run`, which
        # then stops each group in order, and no grandchild outlives its parent.
        self.proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True)
        self.starts.append(time.monotonic())

    def exit_code(self) -> int | None:
        """The exit status if the process has ended, else None."""
        return None if self.proc is None else self.proc.poll()

    def crash_looping(self) -> bool:
        """Whether it was started MAX_STARTS times within WINDOW_S."""
        return len(self.starts) == MAX_STARTS and self.starts[-1] - self.starts[0] < WINDOW_S

    def stop(self, timeout: float = 20.0) -> None:
        """TERM the process (a graceful shutdown), wait, then KILL whatever of its group is left.

        Only the leader gets TERM: gunicorn and Celery stop their own workers in order (Celery
        lets running tasks finish). KILL to the group then reaps anything left behind.
        """
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def supervise_once(children: list[Child]) -> list[str]:
    """Restart every child that has died; returns what happened, one line each.

    Raises RuntimeError for a child that is crash-looping.
    """
    events = []
    for child in children:
        code = child.exit_code()
        if code is None:
            continue
        if child.crash_looping():
            raise RuntimeError(f"{child.name} exited {MAX_STARTS} times within "
                               f"{WINDOW_S:.0f} s (last status {code}); giving up")
        events.append(f"{child.name} exited with status {code}; restarting it")
        child.stop(timeout=0)  # what its group left behind (a pool child of a killed master)
        child.start()
    return events
