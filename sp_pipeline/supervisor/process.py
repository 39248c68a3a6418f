"""One supervised child: spawning, reaping, restart decisions.

Children are fresh interpreters (``python -m sp_pipeline.role ROLE``) so no socket, database
connection or HTTP pool crosses a fork (DESIGN invariant 8); they get their settings
from a JSON file in the run directory. The spawner and the clock are injectable.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from .. import exitcodes
from .states import RestartPolicy, State, check


def child_command(role: str, index: int, settings_path: str) -> List[str]:
    """The command line of a child; ``ps`` shows the role and index."""
    return [sys.executable, "-m", "sp_pipeline.role", role, "--index", str(index),
            "--settings", settings_path]


@dataclass
class Child:
    role: str
    index: int
    command: List[str]
    env: dict
    policy: RestartPolicy
    clock: Callable[[], float]
    spawn: Callable[..., subprocess.Popen] = subprocess.Popen
    state: State = State.STOPPED
    proc: Optional[subprocess.Popen] = None
    started_at: float = 0.0
    restart_at: float = 0.0
    boot_failures: int = 0
    failures: int = 0
    restarts: int = 0
    last_exit: Optional[int] = None
    fatal_reason: str = ""
    history: List[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}" if self.role == "sender" else self.role

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def _to(self, new: State) -> None:
        if self.state is not State.STOPPED or new is not State.STARTING:
            check(self.state, new)
        self.state = new
        self.history.append(new.value)

    def start(self) -> None:
        self.proc = self.spawn(self.command, env=self.env, stdin=subprocess.DEVNULL)
        self.started_at = self.clock()
        self._to(State.STARTING)

    def poll(self) -> Optional[int]:
        """Reap the child if it exited and move the state machine; returns the exit code
        (negative: killed by that signal) or None while it runs."""
        now = self.clock()
        if self.proc is None:
            return None
        code = self.proc.poll()
        if code is None:
            if self.state is State.STARTING and now - self.started_at >= self.policy.boot_seconds:
                self._to(State.RUNNING)
            if self.state is State.RUNNING and now - self.started_at >= self.policy.stable_seconds:
                self.failures = 0
                self.boot_failures = 0
            return None
        self.last_exit = code
        self.proc = None
        if self.state is State.STOPPING:
            self._to(State.STOPPED)
            return code
        booting = now - self.started_at < self.policy.boot_seconds
        self.boot_failures = self.boot_failures + 1 if booting else 0
        self.failures += 1
        if code in exitcodes.NO_RESTART:
            self.fatal_reason = f"{self.name} {exitcodes.describe(code)} (exit {code})"
            self._to(State.FATAL)
        elif self.boot_failures >= self.policy.max_boot_failures:
            self.fatal_reason = (f"{self.name} failed to boot {self.boot_failures} times in a row "
                                 f"(last: {exitcodes.describe(code)})")
            self._to(State.FATAL)
        else:
            self.restart_at = now + self.policy.delay(self.failures)
            self._to(State.BACKOFF)
        return code

    def due(self) -> bool:
        return self.state is State.BACKOFF and self.clock() >= self.restart_at

    def restart(self) -> None:
        self.restarts += 1
        self.start()

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Ask the child to stop (SIGTERM); a child in backoff simply stays down."""
        if self.state in (State.STOPPING, State.STOPPED):
            return
        if self.proc is None:
            self.state = State.STOPPED
            return
        self._to(State.STOPPING)
        self.signal(signal.SIGTERM)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def running(self) -> bool:
        return self.proc is not None and self.state in (State.STARTING, State.RUNNING)


__all__ = ["Child", "child_command"]
